//! The prefix index: a bounded model of which prompt prefixes each worker's KV cache still holds.
//!
//! vLLM keeps the KV blocks of recent prompts and reuses them when a new prompt starts the same way
//! (automatic prefix caching). The gateway cannot see those caches, but it knows where it sent each
//! prompt, so it can mirror them: a worker that recently served a prompt beginning with chunks
//! `c0 c1 .. ck` holds their KV blocks *until its cache needs the room*.
//!
//! A request carries chained hashes `h0 .. hn` of its prompt's chunks ([`gateway_core::prefix`]): `hi`
//! covers chunks `0..=i`, so two prompts share `hi` exactly when their first `i + 1` chunks agree. The
//! index remembers `(hash, worker)` pairs; the predicted cache hit of a request on a worker is the
//! leading run of its hashes that the worker holds.
//!
//! # A cache per worker, evicted as the engine evicts
//! A worker's cache holds a fixed number of tokens. vLLM frees a finished request's blocks to an LRU
//! free queue, tail block first, and takes the least recently used free block when it needs one; a
//! block touched again by a later prompt leaves the queue. So the engine forgets a worker's prefixes
//! in least-recently-used order, chains from their tail. The index does the same per worker: each
//! worker has its own recency list and a capacity in entries ([`PrefixIndex::set_capacity`]; the
//! policy converts the worker's capacity in tokens at `chunk tokens` per entry); recording past it
//! evicts that worker's least recently used pairs. A predicted hit is thus one the worker still holds,
//! not one it served an hour and a hundred prompts ago. A worker without a known capacity is bounded
//! only by the global bound below.
//!
//! # Why a binary search over the run is sound
//! The held hashes of a worker are *prefix-closed*: holding `hi` implies holding `h0 .. hi-1`. Chaining
//! gives half of it (whoever sent `hi` sent the whole chain below it); the other half is eviction order.
//! [`PrefixIndex::record`] touches a request's hashes from the last to the first, so within one request
//! the leading hashes are the most recently used, and any later touch of `hi` also touches `h0 .. hi-1`
//! after it. Least-recently-used eviction, from the global list or a worker's own (the global order
//! restricted to that worker), therefore always evicts a chain from its tail, never opens a hole in
//! the middle, and "does the worker hold `hi`" is monotone in `i`: `partition_point` finds the run in
//! `O(log n)` lookups.
//!
//! # Bound
//! At most `max_entries` pairs in total over all workers, evicted least recently used first, whatever
//! the per-worker capacities say. Nodes live in a slab (`Vec`) linked into two recency lists by index
//! (the global one and their worker's), so a touch or an eviction is `O(1)` and the memory never grows
//! past the bound. Per hash, the holders are a short list: a hash is held by as many workers as it was
//! routed to, which prefix-aware routing keeps small. Per-worker records are one per worker of the
//! fleet, dropped by [`PrefixIndex::forget`].

use crate::util::IdMap;
use gateway_core::WorkerId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    hash: u64,
    worker: WorkerId,
    /// Towards the most recently used end of the global list.
    prev: u32,
    /// Towards the least recently used end of the global list.
    next: u32,
    /// Towards the most recently used end of the worker's list.
    wprev: u32,
    /// Towards the least recently used end of the worker's list.
    wnext: u32,
}

/// One worker's cache: its recency list and capacity.
#[derive(Debug, Clone, Copy)]
struct WorkerCache {
    head: u32,
    tail: u32,
    len: usize,
    /// Most pairs it holds; `usize::MAX` when unknown.
    cap: usize,
}

impl Default for WorkerCache {
    fn default() -> Self {
        Self { head: NIL, tail: NIL, len: 0, cap: usize::MAX }
    }
}

/// A bounded LRU model of `(prefix hash, worker)` pairs, per worker and overall; see the module docs.
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
    workers: IdMap<WorkerId, WorkerCache>,
}

impl PrefixIndex {
    /// An empty index remembering at most `max_entries` pairs (at least 1).
    pub fn new(max_entries: usize) -> Self {
        // Clamped so the slab's `u32` links can address every node.
        let cap = max_entries.clamp(1, NIL as usize - 1);
        Self {
            cap,
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            by_hash: IdMap::default(),
            workers: IdMap::default(),
        }
    }

    /// Pairs currently remembered (for metrics).
    pub fn entries(&self) -> usize {
        self.len
    }

    /// The bound on [`Self::entries`].
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Pairs remembered for `worker`: the size of its modelled cache, in chunks.
    pub fn held(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.len)
    }

    /// The capacity of `worker`'s modelled cache in pairs, `None` when unknown (only the global bound).
    pub fn capacity_of(&self, worker: WorkerId) -> Option<usize> {
        self.workers.get(&worker).map(|w| w.cap).filter(|&c| c != usize::MAX)
    }

    /// Sets how many pairs `worker`'s cache holds (`None`: unknown) and evicts its least recently used
    /// pairs beyond that at once.
    pub fn set_capacity(&mut self, worker: WorkerId, cap: Option<usize>) {
        let w = self.workers.entry(worker).or_default();
        w.cap = cap.unwrap_or(usize::MAX);
        self.evict_worker(worker);
    }

    /// Remembers that a request with these chained `hashes` was sent to `worker`.
    pub fn record(&mut self, hashes: &[u64], worker: WorkerId) {
        // Last to first, so the leading hashes end up most recent (keeps each worker prefix-closed).
        for &h in hashes.iter().rev() {
            self.touch(h, worker);
        }
        self.evict_worker(worker);
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

    /// Drops everything remembered for `worker`, its capacity included.
    pub fn forget(&mut self, worker: WorkerId) {
        while let Some(tail) = self.workers.get(&worker).map(|w| w.tail).filter(|&t| t != NIL) {
            self.remove(tail);
        }
        self.workers.remove(&worker);
    }

    /// Evicts `worker`'s least recently used pairs beyond its capacity.
    fn evict_worker(&mut self, worker: WorkerId) {
        while let Some(tail) = self.workers.get(&worker).filter(|w| w.len > w.cap).map(|w| w.tail) {
            self.remove(tail);
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
        let node = Node { hash, worker, prev: NIL, next: NIL, wprev: NIL, wnext: NIL };
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
        self.workers.entry(worker).or_default().len += 1;
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
        if let Some(w) = self.workers.get_mut(&worker) {
            w.len -= 1;
        }
        if let Some(hs) = self.by_hash.get_mut(&hash) {
            hs.retain(|&(w, _)| w != worker);
            if hs.is_empty() {
                self.by_hash.remove(&hash);
            }
        }
        self.free.push(i);
        self.len -= 1;
    }

    /// Takes node `i` out of both recency lists (its worker's `len` is left to the caller).
    fn unlink(&mut self, i: u32) {
        let Node { prev, next, wprev, wnext, worker, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        let Some(w) = self.workers.get_mut(&worker) else { return };
        match wprev {
            NIL => w.head = wnext,
            p => self.nodes[p as usize].wnext = wnext,
        }
        match wnext {
            NIL => w.tail = wprev,
            n => self.nodes[n as usize].wprev = wprev,
        }
    }

    /// Puts node `i` at the most recent end of both lists (its worker's record must exist).
    fn push_front(&mut self, i: u32) {
        let old = self.head;
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = old;
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
        let worker = self.nodes[i as usize].worker;
        let Some(w) = self.workers.get_mut(&worker) else { return };
        let old = w.head;
        w.head = i;
        if old == NIL {
            w.tail = i;
        }
        self.nodes[i as usize].wprev = NIL;
        self.nodes[i as usize].wnext = old;
        if old != NIL {
            self.nodes[old as usize].wprev = i;
        }
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

    #[test]
    fn a_worker_evicts_its_own_least_recent_prefixes_at_its_capacity() {
        let mut idx = PrefixIndex::new(1_000);
        let (a, b, c) = (chain("aaaabbbbcccc"), chain("xxxxyyyyzzzz"), chain("qqqqrrrrssss"));
        idx.set_capacity(1, Some(6));
        idx.record(&a, 1);
        idx.record(&b, 1);
        idx.record(&c, 2); // another worker's cache does not count against worker 1's
        assert_eq!((idx.held(1), idx.held(2), idx.capacity_of(1), idx.capacity_of(2)), (6, 3, Some(6), None));
        idx.record(&a, 1); // touch: `a` is now more recent than `b`
        idx.record(&c, 1); // 9 > 6: the least recent chain, `b`, goes, whole
        assert_eq!((idx.match_len(1, &a), idx.match_len(1, &b), idx.match_len(1, &c)), (3, 0, 3));
        assert_eq!(idx.match_len(2, &c), 3);
        // A request longer than the cache keeps its head: the tail is what the engine evicts first.
        let long = chain(&"abcd".repeat(10));
        idx.record(&long, 1);
        assert_eq!((idx.match_len(1, &long), idx.match_len(1, &a)), (6, 0));
        // Shrinking evicts at once, from the tail; unknown capacity lifts the per-worker bound.
        idx.set_capacity(1, Some(2));
        assert_eq!((idx.held(1), idx.match_len(1, &long)), (2, 2));
        idx.set_capacity(1, None);
        idx.record(&a, 1);
        idx.record(&b, 1);
        assert_eq!((idx.held(1), idx.entries()), (8, 11));
        idx.forget(1);
        assert_eq!((idx.held(1), idx.capacity_of(1), idx.entries()), (0, None, 3));
    }

    proptest! {
        /// Whatever the traffic and capacities, both bounds hold and every worker's memory stays
        /// prefix-closed, so the binary search in `match_len` equals a linear scan.
        #[test]
        fn bound_and_prefix_closure(
            cap in 1usize..40,
            worker_caps in prop::collection::vec(prop::option::of(0usize..20), 4),
            reqs in prop::collection::vec((0u64..4, prop::collection::vec(0u8..3, 0..12)), 1..60),
        ) {
            let mut idx = PrefixIndex::new(cap);
            for (w, &c) in worker_caps.iter().enumerate() {
                idx.set_capacity(w as u64, c);
            }
            let mut seen = Vec::new();
            for (worker, chunks) in &reqs {
                let text: String = chunks.iter().map(|c| char::from(b'a' + c).to_string().repeat(4)).collect();
                let hashes = chain(&text);
                idx.record(&hashes, *worker);
                prop_assert!(idx.entries() <= cap);
                for (w, &c) in worker_caps.iter().enumerate() {
                    prop_assert!(idx.held(w as u64) <= c.unwrap_or(usize::MAX));
                }
                prop_assert_eq!((0..4).map(|w| idx.held(w)).sum::<usize>(), idx.entries());
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
