//! `least_connections`: fewest requests in flight from this gateway, ties at random.
//!
//! `in_flight` is the one load signal the gateway knows exactly and at once: it is counted by a guard
//! that lives as long as the response body, so a long stream counts until its last byte. It ignores
//! work other clients put on the worker, but it never lags a scrape, so it suits fleets the gateway
//! owns alone or workers that expose no metrics. Ties are broken at random so that equal workers (the
//! common case at low load, when all are at 0) share traffic instead of the first one taking it all.

use crate::policy::Policy;
use crate::util::argmin_random_tie;
use gateway_core::{RequestFeatures, WorkerView};
use rand::RngCore;

/// Picks the candidate with the fewest requests in flight; ties at random.
#[derive(Debug, Default)]
pub struct LeastConnections;

impl Policy for LeastConnections {
    fn name(&self) -> &'static str {
        "least_connections"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, _req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        argmin_random_tie(candidates.len(), |i| candidates[i].in_flight, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;

    #[test]
    fn picks_the_fewest_in_flight_and_spreads_ties() {
        let mut ws = views(4);
        for (w, n) in ws.iter_mut().zip([3, 1, 2, 1]) {
            w.in_flight = n;
            w.waiting = 10 - n; // ignored by this strategy
        }
        let mut rng = rng(5);
        let mut counts = [0; 4];
        for _ in 0..1000 {
            counts[LeastConnections.select(&RequestFeatures::default(), &ws, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        assert!(counts[1] > 400 && counts[3] > 400, "{counts:?}");
        assert_eq!(LeastConnections.select(&RequestFeatures::default(), &[], &mut rng), None);
    }

    proptest! {
        #[test]
        fn never_out_of_range_and_minimal(loads in prop::collection::vec(0u32..4, 0..20), seed: u64) {
            let ws: Vec<WorkerView> = loads
                .iter()
                .enumerate()
                .map(|(i, &in_flight)| WorkerView { id: i as u64, in_flight, ..Default::default() })
                .collect();
            let pick = LeastConnections.select(&RequestFeatures::default(), &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            if let Some(i) = pick {
                prop_assert!(ws.iter().all(|w| w.in_flight >= ws[i].in_flight));
            }
        }
    }
}
