//! Dispatch records shared by the replicas, so prefix affinity is the same from any of them.
//!
//! A policy that reads prompt-prefix hashes (`p2c_kv`) remembers where each prompt went (its prefix
//! index) and sends the next request starting the same way to the worker holding it. With several
//! replicas each remembered only its own dispatches, so a conversation whose turns reach different
//! replicas found no holder at the next one and landed on a random worker, without its cache.
//!
//! With `backend = "redis"` (and `share_dispatches`, on by default) each dispatch with prefix hashes is also queued here
//! ([`Cluster::share_dispatch`]: the worker's URL and the first [`MAX_SHARED_HASHES`] hashes; a full
//! queue drops the record, the request never waits), and a background task publishes the waiting
//! records together, one `PUBLISH` per batch on [`super::redis::DISPATCH_CHANNEL`], fire and forget.
//! Every other replica feeds what it hears to its own policy as a dispatch to that worker (by URL, the
//! one name every replica gives a worker; unknown workers and its own messages are skipped), so all
//! indexes hold the same prompts on the same workers and pick the same holder. The prefix hashes are
//! a fixed function of the model name and the prompt bytes ([`gateway_core::prefix`], no per-process
//! seed), so equal prompts hash alike in every process.
//!
//! No deterministic tie-break is added for prompts no worker holds yet: the first turn of a
//! conversation is placed by p2c (load decides), and only a second turn arriving at another replica
//! before the first's record (a round trip to Redis, well under a request's time) would differ.

use super::{redis, Cluster};
use gateway_core::RequestFeatures;
use routing::Policy;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most prefix hashes shared per dispatch (8 bytes each; the default hashes at most 128 chunks).
pub const MAX_SHARED_HASHES: usize = 128;
/// Records waiting to be published at most; past it, records are dropped.
pub(super) const DISPATCH_QUEUE: usize = 4096;
/// Most records published in one message.
const DISPATCH_BATCH: usize = 64;
/// How long one publish may take before the batch is given up.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// One dispatch to tell the other replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRecord {
    /// The worker's base URL.
    pub url: String,
    /// Prompt bytes per hash.
    pub chunk_bytes: u32,
    /// The prompt's leading prefix hashes.
    pub hashes: Vec<u64>,
}

impl Cluster {
    /// Queues a record of `features` dispatched to the worker at `url`, for the other replicas' prefix
    /// indexes (`backend = "redis"`, Redis up, the request has prefix hashes; else nothing). Never
    /// blocks: a full queue drops the record.
    pub fn share_dispatch(&self, url: &str, features: &RequestFeatures) {
        if features.prefix_hashes.is_empty()
            || !self.cfg.share_dispatches
            || self.redis.is_none()
            || !self.shares_slots()
        {
            return;
        }
        let hashes = &features.prefix_hashes[..features.prefix_hashes.len().min(MAX_SHARED_HASHES)];
        let record = DispatchRecord {
            url: url.to_string(),
            chunk_bytes: u32::try_from(features.chunk_bytes).unwrap_or(u32::MAX),
            hashes: hashes.to_vec(),
        };
        if self.dispatches.try_send(record).is_err() {
            tracing::trace!("cluster: dispatch record queue full; record dropped");
        }
    }

    /// Feeds the records of one heard message to `policy` as dispatches to this replica's workers.
    pub(super) fn hear_dispatches(&self, payload: &[u8], fleet: &crate::fleet::Fleet, policy: &dyn Policy) {
        // Its own messages come back too (it subscribes to the channel it publishes on): not read.
        if !policy.uses_prefix_hashes() || sender(payload).is_none_or(|from| from == self.replica.as_bytes()) {
            return;
        }
        let Some((_, records)) = decode(payload) else {
            tracing::debug!("cluster: a dispatch message could not be read; skipped");
            return;
        };
        for r in records {
            let Some(w) = fleet.workers.iter().find(|w| w.base_url == r.url) else { continue };
            let features = RequestFeatures {
                prefix_hashes: r.hashes,
                chunk_bytes: r.chunk_bytes as usize,
                ..RequestFeatures::default()
            };
            let _ = policy.on_dispatch(&features, w.id);
        }
    }
}

/// Publishes the records waiting, together, as they come.
pub(super) async fn dispatch_loop(
    redis: redis::RedisSlots,
    replica: String,
    mut rx: mpsc::Receiver<DispatchRecord>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(DISPATCH_BATCH);
    let mut message = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, DISPATCH_BATCH) => if n == 0 { return },
        }
        encode(replica.as_bytes(), &batch, &mut message);
        batch.clear();
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, redis.publish(redis::DISPATCH_CHANNEL, &message)).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!("cluster: dispatch records not published; the others place those prompts alone");
        }
    }
}

/// Writes a message: the sender's id (length byte, bytes), then per record the URL (u16 length,
/// bytes), chunk bytes (u32), the hash count (u16) and the hashes (u64), little-endian.
pub fn encode(from: &[u8], records: &[DispatchRecord], out: &mut Vec<u8>) {
    out.clear();
    let from = &from[..from.len().min(usize::from(u8::MAX))];
    out.push(from.len() as u8);
    out.extend_from_slice(from);
    for r in records {
        let url = &r.url.as_bytes()[..r.url.len().min(usize::from(u16::MAX))];
        let hashes = &r.hashes[..r.hashes.len().min(MAX_SHARED_HASHES)];
        out.extend_from_slice(&(url.len() as u16).to_le_bytes());
        out.extend_from_slice(url);
        out.extend_from_slice(&r.chunk_bytes.to_le_bytes());
        out.extend_from_slice(&(hashes.len() as u16).to_le_bytes());
        for h in hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }
}

/// The sender's id of a message written by [`encode`], read without the records.
pub fn sender(msg: &[u8]) -> Option<&[u8]> {
    msg.get(1..1 + usize::from(*msg.first()?))
}

/// Reads a message written by [`encode`]: the sender's id and the records; `None` when malformed
/// (a record claiming more than [`MAX_SHARED_HASHES`] hashes is).
pub fn decode(mut msg: &[u8]) -> Option<(&[u8], Vec<DispatchRecord>)> {
    fn take<'a>(msg: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (msg.get(..n)?, msg.get(n..)?);
        *msg = rest;
        Some(head)
    }
    let n = usize::from(*take(&mut msg, 1)?.first()?);
    let from = take(&mut msg, n)?;
    let mut records = Vec::new();
    while !msg.is_empty() {
        let len = usize::from(u16::from_le_bytes(take(&mut msg, 2)?.try_into().ok()?));
        let url = std::str::from_utf8(take(&mut msg, len)?).ok()?.to_string();
        let chunk_bytes = u32::from_le_bytes(take(&mut msg, 4)?.try_into().ok()?);
        let count = usize::from(u16::from_le_bytes(take(&mut msg, 2)?.try_into().ok()?));
        if count > MAX_SHARED_HASHES {
            return None;
        }
        let raw = take(&mut msg, count * 8)?;
        let hashes = raw.chunks_exact(8).filter_map(|b| b.try_into().ok()).map(u64::from_le_bytes).collect();
        records.push(DispatchRecord { url, chunk_bytes, hashes });
    }
    Some((from, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(url: &str, n: u64) -> DispatchRecord {
        DispatchRecord {
            url: url.into(),
            chunk_bytes: 128,
            hashes: (0..n).map(|i| i.wrapping_mul(0x9e37_79b9)).collect(),
        }
    }

    #[test]
    fn a_message_reads_back_as_written() {
        let records = vec![record("http://a:1", 3), record("http://b:2", 0), record("http://c:3", 128)];
        let mut msg = Vec::new();
        encode(b"replica-1", &records, &mut msg);
        let (from, back) = decode(&msg).expect("reads");
        assert_eq!(from, b"replica-1");
        assert_eq!(sender(&msg), Some(&b"replica-1"[..]));
        assert_eq!(back, records);
        assert_eq!(msg.len(), 1 + 9 + 3 * (2 + 10 + 4 + 2) + (3 + 128) * 8, "bounded: 8 bytes per hash");
    }

    #[test]
    fn hashes_past_the_cap_are_not_sent_and_bad_messages_are_refused() {
        let mut msg = Vec::new();
        encode(b"r", &[record("http://a:1", 500)], &mut msg);
        assert_eq!(decode(&msg).expect("reads").1[0].hashes.len(), MAX_SHARED_HASHES);
        for cut in 1..msg.len() {
            // Any truncation is refused or reads fewer records, never panics.
            if let Some((_, rs)) = decode(&msg[..cut]) {
                assert!(rs.is_empty());
            }
        }
        assert_eq!(decode(&[]), None);
        let mut too_many = vec![1, b'r', 1, 0, b'u', 128, 0, 0, 0];
        too_many.extend_from_slice(&(MAX_SHARED_HASHES as u16 + 1).to_le_bytes());
        assert_eq!(decode(&too_many), None);
    }
}
