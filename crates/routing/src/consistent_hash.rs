//! `consistent_hash`: a session sticks to one worker, and moves only when it must.
//!
//! # The ring
//! Each worker id is hashed to `replicas` points on a 64-bit ring (its *virtual nodes*); a request's
//! session key is hashed to a point too, and the request goes to the owner of the first virtual node
//! clockwise from it. A conversation's turns therefore land on the worker that holds its KV cache.
//! When a worker leaves, only the keys whose first node was one of its nodes move, each to the next node
//! clockwise: about `1/n` of the keys, where a `hash % n` scheme would move almost all of them. Many
//! virtual nodes per worker even out the arcs each worker owns (the spread of a worker's share shrinks
//! like `1/sqrt(replicas)`). Points are `gateway_core::prefix::hash_bytes`/`fmix64`, which are stable
//! across toolchains, so the golden key-to-worker table in the tests keeps its meaning.
//!
//! # Bounded loads
//! A popular key would pin all its traffic on one worker. Following Mirrokni, Thorup and Zadimoghaddam
//! (*Consistent Hashing with Bounded Loads*, used by Google Cloud Pub/Sub and HAProxy), no worker takes
//! a request while its `in_flight` is at the cap `ceil(load_factor * (total_in_flight + 1) / n)`: the
//! key passes clockwise to the next worker under the cap. Since the mean load is below the cap, some
//! worker is always under it, and each key still moves only as far as loads demand.
//!
//! # The ring cache
//! The ring is built from the current candidate ids and cached behind a lock, keyed by the id set, so it
//! is rebuilt only when the candidate set changes. A few rings are kept (most recently used first)
//! because different models or a flapping worker can alternate between a handful of sets.
//!
//! A request without a session key has nothing to stick to and goes to a uniformly random candidate.

use crate::config::ConsistentHashConfig;
use crate::policy::Policy;
use gateway_core::prefix::{fmix64, hash_bytes};
use gateway_core::{RequestFeatures, WorkerId, WorkerView};
use parking_lot::Mutex;
use rand::{Rng, RngCore};
use std::sync::Arc;

/// Rings kept in the cache.
const CACHED_RINGS: usize = 4;

/// Order-independent fingerprint of a candidate id set.
fn fingerprint(candidates: &[WorkerView]) -> u64 {
    candidates.iter().fold(0u64, |acc, w| acc.wrapping_add(fmix64(w.id ^ 0x9e37_79b9_7f4a_7c15)))
}

/// The point of virtual node `replica` of worker `id`.
fn vnode_point(id: WorkerId, replica: u32) -> u64 {
    hash_bytes(fmix64(id), &replica.to_le_bytes())
}

/// The point of a session key.
fn key_point(key: u64) -> u64 {
    fmix64(key)
}

/// A hash ring over one set of worker ids.
#[derive(Debug)]
struct Ring {
    /// Candidate count and fingerprint it was built for.
    n: usize,
    fingerprint: u64,
    /// Distinct worker ids, sorted.
    ids: Vec<WorkerId>,
    /// Virtual nodes sorted by point: `(point, index into ids)`.
    points: Vec<(u64, u32)>,
}

impl Ring {
    fn build(candidates: &[WorkerView], replicas: u32) -> Self {
        let mut ids: Vec<WorkerId> = candidates.iter().map(|w| w.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(ids.len() * replicas as usize);
        for (slot, &id) in ids.iter().enumerate() {
            points.extend((0..replicas).map(|r| (vnode_point(id, r), slot as u32)));
        }
        points.sort_unstable();
        Self { n: candidates.len(), fingerprint: fingerprint(candidates), ids, points }
    }

    fn matches(&self, candidates: &[WorkerView], fp: u64) -> bool {
        self.n == candidates.len()
            && self.fingerprint == fp
            && candidates.iter().all(|w| self.ids.binary_search(&w.id).is_ok())
    }

    /// Ring positions clockwise from `key`'s point, wrapping once around.
    fn clockwise(&self, key: u64) -> impl Iterator<Item = WorkerId> + '_ {
        let start = self.points.partition_point(|&(p, _)| p < key_point(key));
        let (after, before) = self.points.split_at(start);
        before.iter().chain(after).map(|&(_, slot)| self.ids[slot as usize])
    }
}

/// Consistent hashing of the session key with bounded loads.
#[derive(Debug)]
pub struct ConsistentHash {
    cfg: ConsistentHashConfig,
    rings: Mutex<Vec<Arc<Ring>>>,
    #[cfg(test)]
    builds: std::sync::atomic::AtomicUsize,
}

impl ConsistentHash {
    /// A policy with this ring size and load factor.
    pub fn new(cfg: ConsistentHashConfig) -> Self {
        Self {
            cfg,
            rings: Mutex::new(Vec::with_capacity(CACHED_RINGS)),
            #[cfg(test)]
            builds: Default::default(),
        }
    }

    /// The ring for this candidate set, from the cache or freshly built.
    fn ring(&self, candidates: &[WorkerView]) -> Arc<Ring> {
        let fp = fingerprint(candidates);
        let mut rings = self.rings.lock();
        if let Some(pos) = rings.iter().position(|r| r.matches(candidates, fp)) {
            rings[..=pos].rotate_right(1);
            return Arc::clone(&rings[0]);
        }
        // Building holds the lock: concurrent picks on the same new set wait for one build, not many.
        #[cfg(test)]
        self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ring = Arc::new(Ring::build(candidates, self.cfg.replicas.max(1)));
        rings.truncate(CACHED_RINGS - 1);
        rings.insert(0, Arc::clone(&ring));
        ring
    }

    /// The in-flight count a worker must be below to take one more request.
    fn cap(&self, candidates: &[WorkerView]) -> u64 {
        let total: u64 = candidates.iter().map(|w| u64::from(w.in_flight)).sum();
        let cap = (self.cfg.load_factor * (total + 1) as f64 / candidates.len() as f64).ceil();
        (cap as u64).max(1)
    }
}

impl Policy for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent_hash"
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let Some(key) = req.session_key else {
            return Some(rng.random_range(0..n));
        };
        if n == 1 {
            return Some(0);
        }
        let ring = self.ring(candidates);
        let cap = self.cap(candidates);
        let mut rejected: Option<WorkerId> = None;
        for id in ring.clockwise(key) {
            if rejected == Some(id) {
                continue; // consecutive nodes of a worker already found full
            }
            if let Some(i) = candidates.iter().position(|w| w.id == id) {
                if u64::from(candidates[i].in_flight) < cap {
                    return Some(i);
                }
            }
            rejected = Some(id);
        }
        // Unreachable when the cap is honoured (the mean is below it); stay total regardless.
        crate::util::argmin_random_tie(n, |i| candidates[i].in_flight, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;

    fn keyed(key: u64) -> RequestFeatures {
        RequestFeatures { session_key: Some(key), ..Default::default() }
    }

    fn owner(p: &ConsistentHash, ws: &[WorkerView], key: u64) -> WorkerId {
        ws[p.select(&keyed(key), ws, &mut rng(0)).unwrap()].id
    }

    #[test]
    fn golden_key_to_worker_table() {
        // Pins the ring's hash function and layout: if this changes, every session in a running
        // fleet would move on upgrade.
        let p = ConsistentHash::new(ConsistentHashConfig::default());
        let ws = views(4);
        let table: Vec<WorkerId> = (0..16).map(|k| owner(&p, &ws, k)).collect();
        assert_eq!(table, GOLDEN);
        // The order candidates arrive in does not matter.
        let mut rev = ws.clone();
        rev.reverse();
        let table_rev: Vec<WorkerId> = (0..16).map(|k| owner(&p, &rev, k)).collect();
        assert_eq!(table_rev, GOLDEN);
    }

    const GOLDEN: [WorkerId; 16] = [3, 2, 1, 3, 3, 0, 1, 1, 0, 1, 1, 1, 3, 1, 2, 2];

    #[test]
    fn shares_are_even_and_missing_key_is_random() {
        let p = ConsistentHash::new(ConsistentHashConfig::default());
        let ws = views(4);
        let mut counts = [0usize; 4];
        for k in 0..8000u64 {
            counts[owner(&p, &ws, fmix64(k)) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (1600..2400).contains(&c)), "{counts:?}");
        let mut rng = rng(9);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[p.select(&RequestFeatures::default(), &ws, &mut rng).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn ring_is_rebuilt_only_when_the_set_changes() {
        let p = ConsistentHash::new(ConsistentHashConfig::default());
        let ws = views(5);
        for k in 0..100 {
            owner(&p, &ws, k);
        }
        assert_eq!(p.builds.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Loads change every pick; the set does not.
        let mut busy = ws.clone();
        busy[2].in_flight = 3;
        owner(&p, &busy, 1);
        owner(&p, &ws[..4], 1);
        owner(&p, &ws, 1);
        owner(&p, &ws[..4], 1);
        assert_eq!(p.builds.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Same size, different ids: a new ring.
        let mut other = ws.clone();
        other[0].id = 77;
        owner(&p, &other, 1);
        assert_eq!(p.builds.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn bounded_load_caps_a_hot_key() {
        let p = ConsistentHash::new(ConsistentHashConfig::default());
        let mut ws = views(4);
        let home = owner(&p, &ws, 42);
        for _ in 0..100 {
            let cap = p.cap(&ws);
            let i = p.select(&keyed(42), &ws, &mut rng(0)).unwrap();
            assert!(u64::from(ws[i].in_flight) < cap, "worker {i} at {} with cap {cap}", ws[i].in_flight);
            ws[i].in_flight += 1;
        }
        let max = ws.iter().map(|w| w.in_flight).max().unwrap();
        assert!(max <= 32, "{ws:?}"); // ceil(1.25 * 100 / 4)
        assert_eq!(ws.iter().find(|w| w.in_flight == max).unwrap().id, home);
        // While the home worker is under the cap the key goes home.
        ws[home as usize].in_flight = 0;
        assert_eq!(owner(&p, &ws, 42), home);
    }

    proptest! {
        /// Removing one of `n` workers moves only that worker's keys, about `1/n` of all keys.
        #[test]
        fn removing_a_worker_remaps_about_one_nth(n in 3usize..16, remove in 0usize..16, salt: u64) {
            let p = ConsistentHash::new(ConsistentHashConfig::default());
            let ws: Vec<WorkerView> =
                (0..n as u64).map(|i| WorkerView { id: i * 7 + 3, ..Default::default() }).collect();
            let gone = ws[remove % n].id;
            let rest: Vec<WorkerView> = ws.iter().filter(|w| w.id != gone).cloned().collect();
            let keys = 3000u64;
            let mut moved = 0;
            for k in 0..keys {
                let key = fmix64(k ^ salt);
                let (before, after) = (owner(&p, &ws, key), owner(&p, &rest, key));
                if before != after {
                    prop_assert_eq!(before, gone);
                    moved += 1;
                } else {
                    prop_assert_ne!(before, gone);
                }
            }
            let frac = moved as f64 / keys as f64;
            let expect = 1.0 / n as f64;
            prop_assert!(frac > 0.5 * expect && frac < 1.6 * expect, "moved {frac}, expected about {expect}");
        }

        #[test]
        fn never_out_of_range_and_under_cap(
            set in prop::collection::vec((0u64..40, 0u32..10), 0..12),
            key in prop::option::of(any::<u64>()),
            seed: u64,
        ) {
            let p = ConsistentHash::new(ConsistentHashConfig { replicas: 8, load_factor: 1.25 });
            let mut ws: Vec<WorkerView> =
                set.iter().map(|&(id, in_flight)| WorkerView { id, in_flight, ..Default::default() }).collect();
            ws.sort_by_key(|w| w.id);
            ws.dedup_by_key(|w| w.id); // eligibility never yields one worker twice
            let req = RequestFeatures { session_key: key, ..Default::default() };
            let pick = p.select(&req, &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            prop_assert!(pick.iter().all(|&i| i < ws.len()));
            if let (Some(i), Some(_)) = (pick, key) {
                if ws.len() > 1 {
                    prop_assert!(u64::from(ws[i].in_flight) < p.cap(&ws));
                }
            }
        }
    }
}
