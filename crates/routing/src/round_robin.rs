//! `round_robin`: rotate over the eligible candidates.
//!
//! The simplest fair policy: request `k` goes to candidate `k mod n`, so over any `n` consecutive picks
//! on an unchanged set every worker gets exactly one. It needs no load signal at all, which makes it the
//! right default for identical workers behind one gateway and the baseline the other strategies are
//! measured against. It is blind to speed and queue length, so a slow worker gets the same share as a
//! fast one; `least_queue` and `p2c_kv` fix that.

use crate::policy::Policy;
use gateway_core::{RequestFeatures, WorkerView};
use rand::RngCore;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Rotates over the candidates with one shared atomic counter.
///
/// The candidate set can change between calls (a worker turns unhealthy); taking the counter modulo the
/// current length keeps the rotation even over whatever is eligible now.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, _req: &RequestFeatures, candidates: &[WorkerView], _rng: &mut dyn RngCore) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn views(n: u64) -> Vec<WorkerView> {
        (0..n).map(|id| WorkerView { id, weight: 1, ..Default::default() }).collect()
    }

    #[test]
    fn rotates_evenly_and_handles_empty() {
        let rr = RoundRobin::default();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let req = RequestFeatures::default();
        let ws = views(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.select(&req, &ws, &mut rng).expect("non-empty")] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        assert_eq!(rr.select(&req, &[], &mut rng), None);
        assert_eq!(rr.select(&req, &views(1), &mut rng), Some(0));
    }

    proptest::proptest! {
        #[test]
        fn never_out_of_range(sizes in proptest::collection::vec(0u64..20, 1..40)) {
            let rr = RoundRobin::default();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
            for n in sizes {
                let pick = rr.select(&RequestFeatures::default(), &views(n), &mut rng);
                proptest::prop_assert_eq!(pick.is_none(), n == 0);
                proptest::prop_assert!(pick.iter().all(|&i| (i as u64) < n));
            }
        }
    }
}
