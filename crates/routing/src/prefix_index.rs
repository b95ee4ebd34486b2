//! The prefix index: a bounded, approximate memory of which prompt prefixes went to which worker.
//!
//! vLLM keeps the KV blocks of recent prompts and reuses them when a new prompt starts the same way
//! (automatic prefix caching). The gateway cannot see those caches, but it knows where it sent each
//! prompt, so it can predict them: a worker that recently served a prompt beginning with chunks
//! `c0 c1 .. ck` probably still holds their KV blocks.
//!
//! A request carries chained hashes `h0 .. hn` of its prompt's chunks ([`gateway_core::prefix`]): `hi`
//! covers chunks `0..=i`, so two prompts share `hi` exactly when their first `i + 1` chunks agree. The
//! index remembers `(hash, worker)` pairs; the predicted cached share of a request on a worker is the
//! length of the leading run of its hashes that the worker holds, divided by the number of hashes.
//!
//! # Why a binary search over the run is sound
//! The held hashes of a worker are *prefix-closed*: holding `hi` implies holding `h0 .. hi-1`. Chaining
//! gives half of it (whoever sent `hi` sent the whole chain below it); the other half is eviction order.
//! [`PrefixIndex::record`] touches a request's hashes from the last to the first, so within one request
//! the leading hashes are the most recently used, and any later touch of `hi` also touches `h0 .. hi-1`
//! after it. Least-recently-used eviction therefore always evicts a chain from its tail, never opens a
//! hole in the middle, and "does the worker hold `hi`" is monotone in `i`: `partition_point` finds the
//! run in `O(log n)` lookups.
//!
//! # Bound
//! At most `max_entries` pairs in total over all workers, evicted least recently used first. Nodes live
//! in a slab (`Vec`) linked into a recency list by index, so a touch or an eviction is `O(1)` and the
//! memory never grows past the bound. Per hash, the holders are a short list: a hash is held by as many
//! workers as it was routed to, which prefix-aware routing keeps small.

use crate::util::IdMap;
use gateway_core::WorkerId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    hash: u64,
    worker: WorkerId,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

/// A bounded LRU memory of `(prefix hash, worker)` pairs; see the module docs.
#[derive(Debug)]
pub struct PrefixIndex {
    cap: usize,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used, evicted first.
    tail: u32,
    len: usize,
    /// Each hash's holders: `(worker, node index)`.
    by_hash: IdMap<u64, Vec<(WorkerId, u32)>>,
}

impl PrefixIndex {
    /// An empty index remembering at most `max_entries` pairs (at least 1).
    pub fn new(max_entries: usize) -> Self {
        // Clamped so the slab's `u32` links can address every node.
        let cap = max_entries.clamp(1, NIL as usize - 1);
        Self { cap, nodes: Vec::new(), free: Vec::new(), head: NIL, tail: NIL, len: 0, by_hash: IdMap::default() }
    }

    /// Pairs currently remembered (for metrics).
    pub fn entries(&self) -> usize {
        self.len
    }

    /// The bound on [`Self::entries`].
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Remembers that a request with these chained `hashes` was sent to `worker`.
    pub fn record(&mut self, hashes: &[u64], worker: WorkerId) {
        // Last to first, so the leading hashes end up most recent (keeps each worker prefix-closed).
        for &h in hashes.iter().rev() {
            self.touch(h, worker);
        }
    }

    /// Whether `worker` holds `hash`.
    pub fn holds(&self, worker: WorkerId, hash: u64) -> bool {
        self.by_hash.get(&hash).is_some_and(|hs| hs.iter().any(|&(w, _)| w == worker))
    }

    /// Length of the leading run of `hashes` that `worker` holds.
    pub fn match_len(&self, worker: WorkerId, hashes: &[u64]) -> usize {
        // Cheap miss first: most workers hold none of a given prompt.
        if !hashes.first().is_some_and(|&h| self.holds(worker, h)) {
            return 0;
        }
        hashes.partition_point(|&h| self.holds(worker, h))
    }

    /// The longest leading run of `hashes` held by any worker that `accept`s, with those workers.
    ///
    /// Returns `(0, [])` when no accepted worker holds even the first hash.
    pub fn deepest<'a>(
        &'a self,
        hashes: &[u64],
        accept: impl Fn(WorkerId) -> bool,
    ) -> (usize, impl Iterator<Item = WorkerId> + 'a) {
        let held = |h: &u64| self.by_hash.get(h).is_some_and(|hs| hs.iter().any(|&(w, _)| accept(w)));
        let depth = if hashes.first().is_some_and(held) { hashes.partition_point(held) } else { 0 };
        let holders = depth
            .checked_sub(1)
            .and_then(|d| self.by_hash.get(&hashes[d]))
            .map(|hs| hs.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|&(w, _)| w);
        (depth, holders)
    }

    /// Drops everything remembered for `worker` (`O(entries)`; workers leave rarely).
    pub fn forget(&mut self, worker: WorkerId) {
        let mut i = self.head;
        while i != NIL {
            let next = self.nodes[i as usize].next;
            if self.nodes[i as usize].worker == worker {
                self.remove(i);
            }
            i = next;
        }
    }

    fn touch(&mut self, hash: u64, worker: WorkerId) {
        let found = self.by_hash.get(&hash).and_then(|hs| hs.iter().find(|&&(w, _)| w == worker)).map(|&(_, i)| i);
        if let Some(i) = found {
            self.unlink(i);
            self.push_front(i);
            return;
        }
        if self.len >= self.cap {
            self.remove(self.tail);
        }
        let node = Node { hash, worker, prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.push_front(i);
        self.by_hash.entry(hash).or_default().push((worker, i));
        self.len += 1;
    }

    /// Unlinks node `i`, drops it from its hash's holders and frees its slot.
    fn remove(&mut self, i: u32) {
        if i == NIL {
            return;
        }
        self.unlink(i);
        let Node { hash, worker, .. } = self.nodes[i as usize];
        if let Some(hs) = self.by_hash.get_mut(&hash) {
            hs.retain(|&(w, _)| w != worker);
            if hs.is_empty() {
                self.by_hash.remove(&hash);
            }
        }
        self.free.push(i);
        self.len -= 1;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.nodes[i as usize].prev, self.nodes[i as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = old;
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::prefix::PrefixHasher;
    use proptest::prelude::*;

    fn chain(text: &str) -> Vec<u64> {
        let mut h = PrefixHasher::new("m", 4, 1000);
        h.feed(text.as_bytes());
        h.finish()
    }

    #[test]
    fn match_len_counts_the_leading_run() {
        let mut idx = PrefixIndex::new(100);
        let a = chain("sys-prompt-aaaaquestion1");
        let b = chain("sys-prompt-aaaaquestion2");
        idx.record(&a, 7);
        assert_eq!(idx.match_len(7, &a), a.len());
        assert_eq!(idx.match_len(7, &b), a.len() - 1);
        assert_eq!(idx.match_len(8, &a), 0);
        assert_eq!(idx.match_len(7, &chain("other")), 0);
        assert_eq!(idx.match_len(7, &[]), 0);
        let (depth, holders) = idx.deepest(&b, |_| true);
        assert_eq!((depth, holders.collect::<Vec<_>>()), (a.len() - 1, vec![7]));
        let (depth, holders) = idx.deepest(&b, |w| w != 7);
        assert_eq!((depth, holders.count()), (0, 0));
        assert_eq!(idx.entries(), a.len());
    }

    #[test]
    fn bounded_and_evicts_chains_from_the_tail() {
        let mut idx = PrefixIndex::new(10);
        let long = chain(&"x".repeat(4 * 8)); // 8 hashes
        idx.record(&long, 1);
        idx.record(&chain("yyyyzzzz"), 2); // 2 more: full
        assert_eq!(idx.entries(), 10);
        idx.record(&chain("wwww"), 3); // evicts the deepest of `long`, not its head
        assert_eq!(idx.entries(), 10);
        assert_eq!(idx.match_len(1, &long), 7);
        idx.forget(1);
        assert_eq!(idx.match_len(1, &long), 0);
        assert_eq!(idx.entries(), 3);
    }

    proptest! {
        /// Whatever the traffic, the bound holds and every worker's memory stays prefix-closed,
        /// so the binary search in `match_len` equals a linear scan.
        #[test]
        fn bound_and_prefix_closure(
            cap in 1usize..40,
            reqs in prop::collection::vec((0u64..4, prop::collection::vec(0u8..3, 0..12)), 1..60),
        ) {
            let mut idx = PrefixIndex::new(cap);
            let mut seen = Vec::new();
            for (worker, chunks) in &reqs {
                let text: String = chunks.iter().map(|c| char::from(b'a' + c).to_string().repeat(4)).collect();
                let hashes = chain(&text);
                idx.record(&hashes, *worker);
                prop_assert!(idx.entries() <= cap);
                seen.push(hashes);
            }
            for hashes in &seen {
                for w in 0..4 {
                    let linear = hashes.iter().take_while(|&&h| idx.holds(w, h)).count();
                    prop_assert_eq!(idx.match_len(w, hashes), linear);
                    prop_assert!(hashes[linear..].iter().all(|&h| !idx.holds(w, h)));
                }
            }
        }
    }
}
