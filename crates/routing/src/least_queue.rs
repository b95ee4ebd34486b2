//! `least_queue`: join the shortest queue (JSQ), by `waiting + running` on each worker.
//!
//! A vLLM worker's latency for a new request grows with the work already admitted: requests running
//! share its batch (slower tokens) and requests waiting must drain first (later first token). Sending
//! each request to the worker with the least of both keeps queues level, which for equal workers is
//! optimal for mean waiting time. The caller has already corrected the scraped `waiting`/`running` by
//! what the gateway sent since the scrape, so a burst between scrapes does not pile onto one worker.
//!
//! Ties are broken uniformly at random: with a fixed order (say, the first tied worker) every gateway
//! replica and every burst of requests arriving on equal snapshots would herd onto the same worker.

use crate::policy::Policy;
use crate::util::argmin_random_tie;
use gateway_core::{RequestFeatures, WorkerView};
use rand::RngCore;

/// Picks the candidate with the fewest `waiting + running`; ties at random.
#[derive(Debug, Default)]
pub struct LeastQueue;

impl Policy for LeastQueue {
    fn name(&self) -> &'static str {
        "least_queue"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, _req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        argmin_random_tie(
            candidates.len(),
            |i| u64::from(candidates[i].waiting) + u64::from(candidates[i].running),
            rng,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;

    #[test]
    fn picks_the_shortest_queue() {
        let mut ws = views(3);
        (ws[0].waiting, ws[0].running) = (0, 5);
        (ws[1].waiting, ws[1].running) = (2, 1);
        (ws[2].waiting, ws[2].running) = (4, 0);
        assert_eq!(LeastQueue.select(&RequestFeatures::default(), &ws, &mut rng(1)), Some(1));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let mut ws = views(3);
        ws[0].running = 3;
        (ws[1].waiting, ws[1].running) = (1, 1);
        ws[2].running = 2;
        let mut rng = rng(2);
        let mut counts = [0; 3];
        for _ in 0..1000 {
            counts[LeastQueue.select(&RequestFeatures::default(), &ws, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1] > 400 && counts[2] > 400, "{counts:?}");
    }

    proptest! {
        #[test]
        fn never_out_of_range_and_minimal(loads in prop::collection::vec((0u32..5, 0u32..5), 0..20), seed: u64) {
            let ws: Vec<WorkerView> = loads
                .iter()
                .enumerate()
                .map(|(i, &(waiting, running))| WorkerView { id: i as u64, waiting, running, ..Default::default() })
                .collect();
            let pick = LeastQueue.select(&RequestFeatures::default(), &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            if let Some(i) = pick {
                let load = |w: &WorkerView| w.waiting + w.running;
                prop_assert!(ws.iter().all(|w| load(w) >= load(&ws[i])));
            }
        }
    }
}
