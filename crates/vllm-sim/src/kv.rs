//! The KV-cache block pool with automatic prefix caching, as vLLM's block manager does it: a running
//! request holds blocks; full prompt blocks are named by their chained hash and can be shared; when a
//! request finishes its named blocks stay cached (still reusable) and are evicted least-recently-freed
//! first, tail blocks before head blocks, only when space is needed. Pure logic, no time and no IO.

use std::collections::{BTreeMap, HashMap};

/// Blocks one running request holds; give it back with [`KvCache::release`].
#[derive(Debug, Default)]
pub struct Allocation {
    /// Named (hashed) prompt blocks held, in prompt order.
    hashed: Vec<u64>,
    /// Unnamed blocks held (partial last prompt block and output space).
    anon: usize,
    /// Leading blocks found in the cache (the prefix hit).
    pub hit_blocks: usize,
}

#[derive(Debug)]
struct Block {
    refs: u32,
    /// Key in the eviction order while `refs == 0`.
    lru_tick: Option<u64>,
}

/// A pool of `capacity` blocks: each is free, held by running requests, or cached (evictable).
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    free: usize,
    blocks: HashMap<u64, Block>,
    /// Evictable named blocks by the tick they were freed at; the first entry goes first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
}

impl KvCache {
    /// An empty pool of `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, free: capacity, blocks: HashMap::new(), lru: BTreeMap::new(), tick: 0 }
    }

    /// Total blocks in the pool.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held by running requests (cached-but-free blocks do not count, as in vLLM's usage gauge).
    pub fn used(&self) -> usize {
        self.capacity - self.free - self.lru.len()
    }

    /// Leading blocks of `hashes` (up to `hit_limit`) present in the cache right now: the prefix hit a
    /// request would get if scheduled now.
    pub fn prefix_hit(&self, hashes: &[u64], hit_limit: usize) -> usize {
        hashes.iter().take(hit_limit).take_while(|h| self.blocks.contains_key(h)).count()
    }

    /// Try to give a request `total_blocks` blocks, of which the first `hashes.len()` are named by `hashes`.
    /// Named blocks already cached are reused instead of taking new space; the leading run of them (within
    /// `hit_limit`) is the prefix hit. Returns `None`, changing nothing, when the pool cannot fit it even
    /// after evicting every cached block.
    pub fn allocate(&mut self, hashes: &[u64], hit_limit: usize, total_blocks: usize) -> Option<Allocation> {
        let total_blocks = total_blocks.max(hashes.len());
        let mut present = 0;
        let mut revived = 0;
        for h in hashes {
            if let Some(b) = self.blocks.get(h) {
                present += 1;
                if b.refs == 0 {
                    revived += 1;
                }
            }
        }
        let needed_new = total_blocks - present;
        if needed_new > self.free + self.lru.len() - revived {
            return None;
        }
        let hit_blocks = self.prefix_hit(hashes, hit_limit);
        // Take the reused blocks out of the eviction order before evicting anything.
        for h in hashes {
            if let Some(b) = self.blocks.get_mut(h) {
                b.refs += 1;
                if let Some(t) = b.lru_tick.take() {
                    self.lru.remove(&t);
                }
            }
        }
        while self.free < needed_new {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            self.blocks.remove(&victim);
            self.free += 1;
        }
        let mut new_named = 0;
        for h in hashes {
            self.blocks.entry(*h).or_insert_with(|| {
                new_named += 1;
                Block { refs: 1, lru_tick: None }
            });
        }
        let anon = needed_new - new_named;
        self.free -= needed_new;
        Some(Allocation { hashed: hashes.to_vec(), anon, hit_blocks })
    }

    /// Give back a request's blocks. Named blocks stay cached; the tail is queued for eviction before the
    /// head, so a shared prefix outlives the unique suffixes behind it.
    pub fn release(&mut self, alloc: Allocation) {
        self.free += alloc.anon;
        for h in alloc.hashed.iter().rev() {
            let Some(b) = self.blocks.get_mut(h) else { continue };
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                self.tick += 1;
                b.lru_tick = Some(self.tick);
                self.lru.insert(self.tick, *h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_blocks_stay_cached_and_hit() {
        let mut kv = KvCache::new(10);
        let a = kv.allocate(&[1, 2, 3], 3, 5).unwrap();
        assert_eq!(a.hit_blocks, 0);
        assert_eq!(kv.used(), 5);
        kv.release(a);
        assert_eq!(kv.used(), 0);
        let b = kv.allocate(&[1, 2, 3], 2, 5).unwrap();
        assert_eq!(b.hit_blocks, 2, "hit limited to hit_limit");
        assert_eq!(kv.used(), 5);
        // Running requests share named blocks.
        let c = kv.allocate(&[1, 2, 9], 3, 4).unwrap();
        assert_eq!(c.hit_blocks, 2);
        assert_eq!(kv.used(), 7);
        kv.release(b);
        kv.release(c);
        assert_eq!(kv.used(), 0);
    }

    #[test]
    fn refuses_when_full_and_evicts_tail_first() {
        let mut kv = KvCache::new(4);
        let a = kv.allocate(&[1, 2, 3], 3, 3).unwrap();
        assert!(kv.allocate(&[], 0, 2).is_none());
        kv.release(a);
        // Needs 2 new blocks: evicts 3 then 2 (tail first), keeps 1.
        let b = kv.allocate(&[], 0, 3).unwrap();
        assert_eq!(kv.prefix_hit(&[1, 2, 3], 3), 1);
        kv.release(b);
        assert!(kv.allocate(&[], 0, 5).is_none());
    }
}
