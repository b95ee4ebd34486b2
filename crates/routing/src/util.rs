//! Small helpers shared by the strategies: a fast hasher for worker ids and random tie-breaking.
//!
//! Worker ids and prefix hashes are already well spread (or small integers that `fmix64` spreads), so a
//! SipHash per lookup would only cost time; `IdHasher` keeps maps keyed by them cheap inside a pick.

use gateway_core::prefix::fmix64;
use rand::{Rng, RngCore};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for `u64` keys: xor-rotate the words, finish with murmur3's `fmix64`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(29) ^ n;
    }
}

/// A `HashMap` keyed by ids or hashes, with [`IdHasher`].
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Index of the smallest `key(i)` for `i in 0..n`, ties broken uniformly at random; `None` when `n == 0`.
///
/// Reservoir sampling over the tied minima: the k-th tie replaces the choice with probability `1/k`,
/// which leaves each of the tied indices chosen with probability `1/ties`. The RNG is only touched on ties.
pub(crate) fn argmin_random_tie<K: PartialOrd>(
    n: usize,
    mut key: impl FnMut(usize) -> K,
    rng: &mut dyn RngCore,
) -> Option<usize> {
    let mut best: Option<(usize, K)> = None;
    let mut ties = 0u32;
    for i in 0..n {
        let k = key(i);
        match &best {
            Some((_, b)) if k > *b => {}
            Some((_, b)) if k == *b => {
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((i, k));
                }
            }
            _ => {
                best = Some((i, k));
                ties = 1;
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders shared by the strategies' tests.

    use gateway_core::WorkerView;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// `n` idle workers with ids `0..n` and weight 1.
    pub fn views(n: u64) -> Vec<WorkerView> {
        (0..n).map(|id| WorkerView { id, weight: 1, ..Default::default() }).collect()
    }

    /// A seeded RNG.
    pub fn rng(seed: u64) -> SmallRng {
        SmallRng::seed_from_u64(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmin_breaks_ties_uniformly() {
        let mut rng = testutil::rng(7);
        let keys = [3, 1, 5, 1, 1];
        let mut counts = [0u32; 5];
        for _ in 0..3000 {
            counts[argmin_random_tie(keys.len(), |i| keys[i], &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        for c in [counts[1], counts[3], counts[4]] {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
        assert_eq!(argmin_random_tie(0, |i| i, &mut rng), None);
    }
}
