//! `weighted`: smooth weighted round robin, the interleaving nginx uses for `upstream` weights.
//!
//! Every worker keeps a `current` score. On each pick every candidate's score grows by its weight,
//! the candidate with the highest score wins, and the winner's score drops by the sum of all weights.
//! Over one cycle of `sum(weights)` picks the scores grow by `weight * sum` and the winner pays `sum`
//! each time, so each worker wins exactly `weight` times and the scores return to where they started.
//! Because a winner falls to the back by the whole sum while the others keep climbing, wins spread out:
//! weights 3:1 give `A A B A`, never a burst `A A A B`, and 5:1:1 gives `A A B A C A A`.
//!
//! The candidate set may change between picks (a worker turns unhealthy, a new one joins). Scores live
//! in a map keyed by worker id: a newcomer starts at 0, an absent worker's score waits unchanged for its
//! return, and [`Policy::forget`] drops it for good. Scores stay within `±sum(weights)` of zero, so a
//! returning worker rejoins the rotation without a burst.

use crate::policy::Policy;
use crate::util::IdMap;
use gateway_core::{RequestFeatures, WorkerId, WorkerView};
use parking_lot::Mutex;
use rand::RngCore;

/// Smooth weighted round robin over the candidates' configured weights (a weight of 0 counts as 1).
#[derive(Debug, Default)]
pub struct Weighted {
    current: Mutex<IdMap<WorkerId, i64>>,
}

impl Policy for Weighted {
    fn name(&self) -> &'static str {
        "weighted"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, _req: &RequestFeatures, candidates: &[WorkerView], _rng: &mut dyn RngCore) -> Option<usize> {
        match candidates.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let mut current = self.current.lock();
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, w) in candidates.iter().enumerate() {
            let weight = i64::from(w.weight.max(1));
            total += weight;
            let score = current.entry(w.id).or_insert(0);
            *score += weight;
            if !matches!(best, Some((_, b)) if *score <= b) {
                best = Some((i, *score));
            }
        }
        let (i, _) = best?;
        if let Some(score) = current.get_mut(&candidates[i].id) {
            *score -= total;
        }
        Some(i)
    }

    fn forget(&self, worker: WorkerId) {
        self.current.lock().remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;

    fn weighted(weights: &[u32]) -> Vec<WorkerView> {
        let mut ws = views(weights.len() as u64);
        for (w, &weight) in ws.iter_mut().zip(weights) {
            w.weight = weight;
        }
        ws
    }

    fn picks(policy: &Weighted, ws: &[WorkerView], n: usize) -> Vec<u64> {
        let mut rng = rng(1);
        let req = RequestFeatures::default();
        (0..n).map(|_| ws[policy.select(&req, ws, &mut rng).unwrap()].id).collect()
    }

    #[test]
    fn three_to_one_interleaves() {
        let p = Weighted::default();
        let seq = picks(&p, &weighted(&[3, 1]), 8);
        assert_eq!(seq, [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn nginx_five_one_one_sequence() {
        // The sequence nginx documents for weights 5, 1, 1.
        let p = Weighted::default();
        assert_eq!(picks(&p, &weighted(&[5, 1, 1]), 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn proportions_follow_weights() {
        let p = Weighted::default();
        let ws = weighted(&[4, 2, 1, 1]);
        let mut counts = [0usize; 4];
        for id in picks(&p, &ws, 800) {
            counts[id as usize] += 1;
        }
        assert_eq!(counts, [400, 200, 100, 100]);
    }

    #[test]
    fn candidate_set_changes_and_forget() {
        let p = Weighted::default();
        let all = weighted(&[1, 1, 1]);
        picks(&p, &all, 5);
        // Worker 1 drops out: the other two share evenly.
        let two = vec![all[0].clone(), all[2].clone()];
        let seq = picks(&p, &two, 100);
        let zeros = seq.iter().filter(|&&id| id == 0).count();
        assert!((49..=51).contains(&zeros), "{zeros}");
        // A newcomer joins and gets its share at once.
        let mut three = two.clone();
        three.push(WorkerView { id: 9, weight: 1, ..Default::default() });
        let seq = picks(&p, &three, 99);
        assert_eq!(seq.iter().filter(|&&id| id == 9).count(), 33);
        p.forget(1);
        p.forget(9);
        assert_eq!(p.current.lock().len(), 2);
    }

    proptest! {
        #[test]
        fn never_out_of_range(sets in prop::collection::vec(prop::collection::vec((0u64..12, 0u32..5), 0..8), 1..20)) {
            let p = Weighted::default();
            let mut rng = rng(3);
            let req = RequestFeatures::default();
            for set in sets {
                let mut ws: Vec<WorkerView> =
                    set.iter().map(|&(id, weight)| WorkerView { id, weight, ..Default::default() }).collect();
                ws.sort_by_key(|w| w.id);
                ws.dedup_by_key(|w| w.id);
                let pick = p.select(&req, &ws, &mut rng);
                prop_assert_eq!(pick.is_none(), ws.is_empty());
                prop_assert!(pick.iter().all(|&i| i < ws.len()));
            }
        }

        #[test]
        fn exact_shares_over_a_cycle(weights in prop::collection::vec(1u32..6, 1..6)) {
            let p = Weighted::default();
            let ws = weighted(&weights);
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for id in picks(&p, &ws, total as usize) {
                counts[id as usize] += 1;
            }
            prop_assert_eq!(counts, weights);
        }
    }
}
