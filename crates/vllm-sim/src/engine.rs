//! The scheduler: continuous batching over a KV block pool, the part that makes the simulator honest
//! enough to measure routing with. Requests wait FIFO until a batch slot (`max_num_seqs`) and their KV
//! blocks are free; the head of the queue blocks the ones behind it, as in vLLM. Membership is held by a
//! [`Ticket`] whose `Drop` takes the request out at once (waiting or running) and frees its blocks, so a
//! client that leaves never leaks load.
//!
//! The engine itself keeps no clock: timing (TTFT, ITL) lives in `generate`, which asks the engine only for
//! the batch size.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::kv::{Allocation, KvCache};
use crate::metrics::{Gauges, Metrics};
use crate::tokenizer::Tokenized;

/// What a request learns when it is scheduled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Prompt tokens served from the prefix cache (not prefilled again).
    pub cached_tokens: u32,
}

/// Why a request was refused at the door.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_num_queued` requests are already waiting.
    QueueFull,
    /// The request needs more KV blocks than the whole pool holds.
    TooLarge {
        /// Blocks needed.
        needed: usize,
        /// Blocks in the pool.
        capacity: usize,
    },
}

struct Pending {
    hashes: Vec<u64>,
    hit_limit: usize,
    total_blocks: usize,
    prompt_tokens: u32,
    tx: oneshot::Sender<Admitted>,
}

struct Inner {
    next_id: u64,
    queue: VecDeque<u64>,
    pending: HashMap<u64, Pending>,
    running: HashMap<u64, Allocation>,
    kv: KvCache,
}

/// One simulated engine core: batch slots, a FIFO queue and a KV pool behind one short-held lock.
pub struct Engine {
    max_num_seqs: usize,
    max_num_queued: usize,
    block_size: usize,
    inner: Mutex<Inner>,
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// The engine's Prometheus counters and histograms.
    pub metrics: Metrics,
}

impl Engine {
    /// An idle engine.
    pub fn new(max_num_seqs: usize, max_num_queued: usize, kv_blocks: usize, block_size: usize) -> Self {
        Self {
            max_num_seqs: max_num_seqs.max(1),
            max_num_queued,
            block_size: block_size.max(1),
            inner: Mutex::new(Inner {
                next_id: 0,
                queue: VecDeque::new(),
                pending: HashMap::new(),
                running: HashMap::new(),
                kv: KvCache::new(kv_blocks),
            }),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            metrics: Metrics::default(),
        }
    }

    /// Requests in the running batch.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot or for KV space.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Batch slots (`max_num_seqs`).
    pub fn max_num_seqs(&self) -> usize {
        self.max_num_seqs
    }

    /// Gauges for a scrape, read consistently under the lock.
    pub fn gauges(&self) -> Gauges {
        let inner = self.inner.lock();
        let cap = inner.kv.capacity().max(1);
        Gauges {
            running: inner.running.len(),
            waiting: inner.queue.len(),
            kv_usage: inner.kv.used() as f64 / cap as f64,
            kv_blocks: inner.kv.capacity(),
            block_size: self.block_size,
        }
    }

    /// Enter a request needing its prompt plus `output_tokens` of KV space. It is scheduled at once when it
    /// fits, otherwise it waits; await [`Ticket::admitted`]. Dropping the ticket takes it out again.
    pub fn submit(self: &Arc<Self>, prompt: &Tokenized, output_tokens: u32) -> Result<Ticket, SubmitError> {
        let bs = self.block_size;
        let total_blocks = (prompt.tokens as usize + output_tokens as usize).div_ceil(bs).max(1);
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock();
        let capacity = inner.kv.capacity();
        if total_blocks > capacity {
            return Err(SubmitError::TooLarge { needed: total_blocks, capacity });
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.pending.insert(
            id,
            Pending {
                hashes: prompt.block_hashes.clone(),
                // vLLM always computes the last prompt token, so a full-prompt hit stops one token short.
                hit_limit: (prompt.tokens.saturating_sub(1) as usize) / bs,
                total_blocks,
                prompt_tokens: prompt.tokens,
                tx,
            },
        );
        inner.queue.push_back(id);
        self.schedule(&mut inner);
        if inner.queue.len() > self.max_num_queued && inner.pending.contains_key(&id) {
            inner.pending.remove(&id);
            inner.queue.retain(|q| *q != id);
            self.publish(&inner);
            return Err(SubmitError::QueueFull);
        }
        drop(inner);
        Ok(Ticket { engine: Arc::clone(self), id, rx: Some(rx) })
    }

    /// Admit waiting requests in FIFO order while a slot is free and the head's blocks fit.
    fn schedule(&self, inner: &mut Inner) {
        while inner.running.len() < self.max_num_seqs {
            let Some(&id) = inner.queue.front() else { break };
            let Some(p) = inner.pending.get(&id) else {
                inner.queue.pop_front();
                continue;
            };
            let Some(alloc) = inner.kv.allocate(&p.hashes, p.hit_limit, p.total_blocks) else { break };
            inner.queue.pop_front();
            let Some(p) = inner.pending.remove(&id) else { continue };
            let cached_tokens = u32::try_from(alloc.hit_blocks * self.block_size).unwrap_or(u32::MAX);
            self.metrics.on_scheduled(p.prompt_tokens, cached_tokens);
            inner.running.insert(id, alloc);
            // The receiver only goes away with its ticket, whose drop removes the request under this lock
            // first; an error here therefore cannot happen, and ignoring it is safe.
            let _ = p.tx.send(Admitted { cached_tokens });
        }
        self.publish(inner);
    }

    fn publish(&self, inner: &Inner) {
        self.running.store(inner.running.len(), Ordering::Relaxed);
        self.waiting.store(inner.queue.len(), Ordering::Relaxed);
    }

    fn remove(&self, id: u64) {
        let mut inner = self.inner.lock();
        if let Some(alloc) = inner.running.remove(&id) {
            inner.kv.release(alloc);
        } else if inner.pending.remove(&id).is_some() {
            inner.queue.retain(|q| *q != id);
        }
        self.schedule(&mut inner);
    }
}

/// A request's place in the engine: waiting, then running. Dropping it (finish, error or client gone)
/// removes the request and frees its KV blocks immediately.
pub struct Ticket {
    engine: Arc<Engine>,
    id: u64,
    rx: Option<oneshot::Receiver<Admitted>>,
}

impl Ticket {
    /// Wait until the request is scheduled into the running batch.
    pub async fn admitted(&mut self) -> Admitted {
        match self.rx.take() {
            Some(rx) => rx.await.unwrap_or_default(),
            None => Admitted::default(),
        }
    }

    /// The engine this ticket belongs to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.engine.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tokenize;

    #[tokio::test]
    async fn slots_and_fifo_and_drop_release() {
        let e = Arc::new(Engine::new(2, 2, 100, 16));
        let p = tokenize("m", b"hello", 16);
        let mut a = e.submit(&p, 10).unwrap();
        let b = e.submit(&p, 10).unwrap();
        let c = e.submit(&p, 10).unwrap();
        let _d = e.submit(&p, 10).unwrap();
        assert_eq!(e.submit(&p, 10).err(), Some(SubmitError::QueueFull));
        assert_eq!((e.running(), e.waiting()), (2, 2));
        assert_eq!(a.admitted().await, Admitted { cached_tokens: 0 });
        drop(b);
        assert_eq!((e.running(), e.waiting()), (2, 1));
        drop(c); // a waiting request leaves the queue
        assert_eq!((e.running(), e.waiting()), (2, 0));
        assert_eq!(e.gauges().running, 2);
    }

    #[tokio::test]
    async fn kv_space_limits_admission_and_prefix_hits() {
        let e = Arc::new(Engine::new(10, 10, 10, 16));
        let prompt = vec![b'a'; 64 * 4]; // 64 tokens = 4 blocks
        let p = tokenize("m", &prompt, 16);
        let mut a = e.submit(&p, 64).unwrap(); // 8 blocks
        assert_eq!(a.admitted().await.cached_tokens, 0);
        let mut b = e.submit(&p, 64).unwrap(); // shares 3 blocks (last prompt block never hits), needs 5 more
        assert_eq!(e.waiting(), 1);
        drop(a);
        assert_eq!(b.admitted().await.cached_tokens, 48);
        assert!(matches!(e.submit(&p, 1000), Err(SubmitError::TooLarge { .. })));
    }
}
