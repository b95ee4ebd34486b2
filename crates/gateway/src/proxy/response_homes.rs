//! Which worker holds which stored response, so a `/v1/responses` follow-up naming a
//! `previous_response_id` goes back to it: a worker's response store is its own (vLLM keeps responses
//! in the memory of one process), and any other worker answers 404.
//!
//! The id is read from the answer as it is relayed ([`IdScanner`]: the first `"id"` of a JSON answer,
//! or of a stream's `response.created` event) and remembered with the worker's URL (its process, which
//! outlives a config change of its weight or name) in a map bounded by `responses.max_remembered`,
//! least recently used out first. A follow-up whose worker is gone, unhealthy or not admitting is
//! routed like any request.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Longest response id remembered; longer ones are not ids this gateway routes by.
const MAX_ID: usize = 256;
/// Bytes of an answer searched for its id; a response's id comes first in vLLM's and OpenAI's shapes.
const SCAN_LIMIT: usize = 16 * 1024;

/// Response id -> the base URL of the worker that created it, least recently used forgotten first.
#[derive(Default)]
pub struct ResponseHomes {
    cap: AtomicUsize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// id -> (worker URL, last use).
    map: HashMap<Arc<str>, (Arc<str>, u64)>,
    /// last use -> id, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    clock: u64,
}

impl Lru {
    fn touch(&mut self, id: &Arc<str>) -> Option<Arc<str>> {
        self.clock += 1;
        let clock = self.clock;
        let (url, used) = self.map.get_mut(id)?;
        self.order.remove(used);
        *used = clock;
        self.order.insert(clock, Arc::clone(id));
        Some(Arc::clone(url))
    }

    fn shrink_to(&mut self, cap: usize) {
        while self.map.len() > cap {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.map.remove(&oldest);
        }
    }
}

impl ResponseHomes {
    /// A store remembering at most `cap` ids.
    pub fn new(cap: usize) -> Self {
        Self { cap: AtomicUsize::new(cap), inner: Mutex::default() }
    }

    /// Applies a new `responses.max_remembered` (a reload), forgetting the oldest ids beyond it.
    pub fn set_capacity(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        self.inner.lock().shrink_to(cap);
    }

    /// Whether ids are remembered at all.
    pub fn enabled(&self) -> bool {
        self.cap.load(Ordering::Relaxed) > 0
    }

    /// Remembers that the worker at `worker_url` holds response `id`.
    pub fn remember(&self, id: &str, worker_url: &str) {
        let cap = self.cap.load(Ordering::Relaxed);
        if cap == 0 || id.is_empty() || id.len() > MAX_ID {
            return;
        }
        let id: Arc<str> = Arc::from(id);
        let mut lru = self.inner.lock();
        if lru.touch(&id).is_none() {
            let clock = lru.clock;
            lru.map.insert(Arc::clone(&id), (Arc::from(worker_url), clock));
            lru.order.insert(clock, id);
            lru.shrink_to(cap);
        }
    }

    /// The base URL of the worker that holds response `id`, if remembered (which counts as a use).
    pub fn home_of(&self, id: &str) -> Option<Arc<str>> {
        let id: Arc<str> = Arc::from(id);
        self.inner.lock().touch(&id)
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Finds a response's id in the first [`SCAN_LIMIT`] bytes of its answer, whatever the chunking.
#[derive(Debug, Default)]
pub struct IdScanner {
    seen: Vec<u8>,
    done: bool,
}

impl IdScanner {
    /// Takes the next chunk; returns the id once, when it is first complete.
    pub fn scan(&mut self, chunk: &[u8]) -> Option<String> {
        if self.done {
            return None;
        }
        let room = SCAN_LIMIT.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&chunk[..chunk.len().min(room)]);
        match first_id(&self.seen) {
            Found::Id(id) => {
                self.done = true;
                self.seen = Vec::new();
                Some(id)
            }
            Found::Not => {
                self.done = true;
                self.seen = Vec::new();
                None
            }
            Found::NeedMore => {
                if self.seen.len() >= SCAN_LIMIT {
                    self.done = true;
                    self.seen = Vec::new();
                }
                None
            }
        }
    }
}

enum Found {
    Id(String),
    /// The first `"id"` holds no usable string: this answer names no response.
    Not,
    NeedMore,
}

/// The string value of the first `"id"` key in `text`.
fn first_id(text: &[u8]) -> Found {
    let Some(at) = memchr::memmem::find(text, b"\"id\"") else { return Found::NeedMore };
    let rest = text[at + 4..].trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b":") else {
        return if rest.is_empty() { Found::NeedMore } else { Found::Not };
    };
    let rest = rest.trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b"\"") else {
        return if rest.is_empty() { Found::NeedMore } else { Found::Not };
    };
    match rest.iter().take(MAX_ID + 1).position(|b| *b == b'"') {
        Some(end) => match std::str::from_utf8(&rest[..end]) {
            Ok(id) if !id.is_empty() && !id.contains('\\') => Found::Id(id.to_owned()),
            _ => Found::Not,
        },
        None if rest.len() > MAX_ID => Found::Not,
        None => Found::NeedMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_its_bound_least_recently_used_out_first() {
        let homes = ResponseHomes::new(2);
        homes.remember("a", "http://w1");
        homes.remember("b", "http://w2");
        assert_eq!(homes.home_of("a").as_deref(), Some("http://w1"), "a is now the most recent");
        homes.remember("c", "http://w3");
        assert_eq!(homes.len(), 2);
        assert!(homes.home_of("b").is_none(), "b was the least recently used");
        assert_eq!(homes.home_of("c").as_deref(), Some("http://w3"));
        homes.set_capacity(1);
        assert_eq!(homes.len(), 1);
        homes.set_capacity(0);
        homes.remember("d", "http://w4");
        assert!(homes.home_of("d").is_none(), "0 remembers nothing");
        homes.set_capacity(5);
        homes.remember(&"x".repeat(MAX_ID + 1), "http://w");
        assert!(homes.home_of(&"x".repeat(MAX_ID + 1)).is_none(), "overlong ids are not remembered");
    }

    #[test]
    fn finds_the_id_however_the_answer_is_cut() {
        let json = br#"{"id":"resp_abc123","object":"response","output":[{"id":"msg_1"}]}"#;
        let sse = b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\" : \"resp_s1\",\"output\":[]}}\n\n";
        for (body, want) in [(&json[..], "resp_abc123"), (&sse[..], "resp_s1")] {
            for split in [1, 3, 7, 1000] {
                let mut s = IdScanner::default();
                let found: Vec<String> = body.chunks(split).filter_map(|c| s.scan(c)).collect();
                assert_eq!(found, [want], "split {split}");
            }
        }
        let mut s = IdScanner::default();
        assert_eq!(s.scan(br#"{"id": 5, "x": "resp"}"#), None, "a non-string id names nothing");
        assert_eq!(s.scan(br#"{"id":"later"}"#), None, "and the scanner stops");
        let mut s = IdScanner::default();
        assert_eq!(s.scan(&vec![b' '; SCAN_LIMIT + 10]), None);
        assert_eq!(s.scan(br#"{"id":"too_late"}"#), None, "only the first bytes are searched");
    }
}
