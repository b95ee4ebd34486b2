//! `adaptive`: epsilon-greedy over a learned latency reward per worker.
//!
//! Load signals say how busy a worker is, not how fast it serves: a worker on a slower GPU, a throttled
//! one or one sharing its host answers late at any queue length. This strategy learns speed from
//! outcomes instead, as a multi-armed bandit:
//!
//! - **Reward.** A finished request on a worker scores `cost = ttft_ms + 10 * tpot_ms` (a 10-token
//!   reply's worth of decoding weighed against the wait for the first token), normalised into
//!   `reward = -cost / (cost + 1000)` in `(-1, 0]`: 0 for instant, -0.5 at one second, towards -1 for
//!   very slow. A failure ([`gateway_core::OutcomeKind::is_failure`]) scores -2, worse than any answer;
//!   `Overloaded` (a 429/503) scores -1; client errors and cancellations say nothing about the worker
//!   and are ignored. Non-streamed answers without a TTFT use their whole latency as TTFT.
//! - **Estimate.** Each worker's estimate is an EWMA: `est += learning_rate * (reward - est)`. An
//!   EWMA forgets at a fixed rate, so after `k` outcomes the old regime weighs `(1 - lr)^k`: with the
//!   default 0.1 a worker that slows from 100 ms to 1 s loses the greedy pick after 3 to 4 outcomes,
//!   i.e. within seconds at any real request rate. A worker's first outcome sets its estimate outright.
//! - **Choice.** With probability `epsilon` pick uniformly at random (exploration), else the candidate
//!   with the best estimate *for a request sent now*: the learned cost `-estimate` scaled by
//!   `1 + in_flight`, ties at random. Estimates move only when requests finish, often a second later;
//!   without the load factor every arrival in between would go to the same worker and pile up there
//!   (measured by the routing bench: queues of 45-90 and TTFT p50 over a second). With it, a burst
//!   spreads over the fast workers in proportion to their speed. Exploration is what lets traffic come *back*: a worker
//!   that lost the greedy pick still gets `epsilon / n` of picks, and a few fast answers from it lift
//!   its estimate above the others again. Workers with no estimate yet (new ones) are treated as the
//!   best (optimism in the face of uncertainty), so they are tried first, their load factor spreading
//!   a burst over them until their first outcomes arrive.

use crate::config::AdaptiveConfig;
use crate::policy::Policy;
use crate::util::{argmin_random_tie, IdMap};
use gateway_core::{Outcome, OutcomeKind, RequestFeatures, WorkerId, WorkerView};
use parking_lot::Mutex;
use rand::{Rng, RngCore};

/// Cost (ms) at which the reward is -0.5.
const SCALE_MS: f64 = 1000.0;
/// Reward of a failed request: worse than the slowest success.
const FAILURE_REWARD: f64 = -2.0;
/// Reward of a worker that said it is full.
const OVERLOADED_REWARD: f64 = -1.0;
/// Cost assumed for a worker with no outcome yet: below any learned cost (optimism), yet positive so
/// its load factor still spreads a burst.
const UNKNOWN_COST: f64 = 1e-6;

/// The reward an outcome earns its worker, or `None` when it says nothing about the worker.
pub fn reward(outcome: &Outcome) -> Option<f64> {
    if outcome.kind.is_failure() {
        return Some(FAILURE_REWARD);
    }
    match outcome.kind {
        OutcomeKind::Success => {
            let ttft = outcome.ttft.unwrap_or(outcome.latency).as_secs_f64() * 1000.0;
            let cost = ttft + 10.0 * outcome.tpot_ms().unwrap_or(0.0);
            Some(-cost / (cost + SCALE_MS))
        }
        OutcomeKind::Overloaded => Some(OVERLOADED_REWARD),
        _ => None,
    }
}

/// Epsilon-greedy routing over per-worker EWMA reward estimates.
#[derive(Debug)]
pub struct Adaptive {
    cfg: AdaptiveConfig,
    estimates: Mutex<IdMap<WorkerId, f64>>,
}

impl Adaptive {
    /// A learner with this exploration and learning rate.
    pub fn new(cfg: AdaptiveConfig) -> Self {
        Self { cfg, estimates: Mutex::default() }
    }

    /// The current reward estimate of `worker`, when it has one.
    pub fn estimate(&self, worker: WorkerId) -> Option<f64> {
        self.estimates.lock().get(&worker).copied()
    }
}

impl Policy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn uses_prefix_hashes(&self) -> bool {
        false
    }

    fn select(&self, _req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        let n = candidates.len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        if self.cfg.epsilon > 0.0 && rng.random::<f64>() < self.cfg.epsilon {
            return Some(rng.random_range(0..n));
        }
        let estimates = self.estimates.lock();
        // Minimise the learned cost (negated reward) scaled by load; unknown workers cost almost
        // nothing (optimism) but still count their load.
        argmin_random_tie(
            n,
            |i| {
                let cost = estimates.get(&candidates[i].id).map_or(UNKNOWN_COST, |&e| -e);
                cost * (1.0 + f64::from(candidates[i].in_flight))
            },
            rng,
        )
    }

    fn observe(&self, outcome: &Outcome) {
        let Some(r) = reward(outcome) else { return };
        let lr = self.cfg.learning_rate;
        self.estimates.lock().entry(outcome.worker).and_modify(|e| *e += lr * (r - *e)).or_insert(r);
    }

    fn forget(&self, worker: WorkerId) {
        self.estimates.lock().remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;
    use std::time::Duration;

    fn greedy() -> Adaptive {
        Adaptive::new(AdaptiveConfig { epsilon: 0.0, learning_rate: 0.1 })
    }

    fn outcome(worker: WorkerId, kind: OutcomeKind, ttft_ms: u64) -> Outcome {
        Outcome {
            output_tokens: 21, // tpot 10 ms
            ..Outcome::new(worker, kind, Some(Duration::from_millis(ttft_ms)), Duration::from_millis(ttft_ms + 20 * 10))
        }
    }

    fn ok(worker: WorkerId, ttft_ms: u64) -> Outcome {
        outcome(worker, OutcomeKind::Success, ttft_ms)
    }

    fn pick(p: &Adaptive, ws: &[WorkerView]) -> WorkerId {
        ws[p.select(&RequestFeatures::default(), ws, &mut rng(1)).unwrap()].id
    }

    #[test]
    fn reward_orders_outcomes() {
        let fast = reward(&ok(0, 100)).unwrap();
        let slow = reward(&ok(0, 2000)).unwrap();
        let full = reward(&outcome(0, OutcomeKind::Overloaded, 1)).unwrap();
        let failed = reward(&outcome(0, OutcomeKind::Timeout, 1)).unwrap();
        assert!(0.0 > fast && fast > slow && slow > full && full > failed, "{fast} {slow} {full} {failed}");
        assert!((fast - -0.1667).abs() < 1e-3); // cost 200 ms
        assert_eq!(reward(&outcome(0, OutcomeKind::Cancelled, 1)), None);
        assert_eq!(reward(&outcome(0, OutcomeKind::ClientError, 1)), None);
    }

    #[test]
    fn unknown_workers_are_explored_first() {
        let p = greedy();
        let ws = views(3);
        p.observe(&ok(0, 10));
        p.observe(&ok(1, 10));
        assert_eq!(pick(&p, &ws), 2);
        p.observe(&ok(2, 500));
        assert!(pick(&p, &ws) < 2);
        p.forget(2);
        assert_eq!(p.estimate(2), None);
        assert_eq!(pick(&p, &ws), 2);
    }

    #[test]
    fn greedy_pick_flips_to_the_faster_worker_and_back() {
        let p = greedy();
        let ws = views(2);
        for _ in 0..50 {
            p.observe(&ok(0, 100));
            p.observe(&ok(1, 300));
        }
        assert_eq!(pick(&p, &ws), 0);
        // Worker 0 slows down: within a handful of outcomes the greedy pick moves to worker 1.
        let mut n = 0;
        while pick(&p, &ws) == 0 {
            p.observe(&ok(0, 1500));
            n += 1;
        }
        assert!(n <= 5, "took {n} outcomes");
        // It recovers: the answers exploration brings back from it lift it above worker 1 again.
        let mut n = 0;
        while pick(&p, &ws) == 1 {
            p.observe(&ok(0, 100));
            p.observe(&ok(1, 300));
            n += 1;
        }
        assert!(n <= 12, "took {n} outcomes");
    }

    #[test]
    fn failures_push_traffic_away() {
        let p = greedy();
        let ws = views(2);
        p.observe(&ok(0, 50));
        p.observe(&ok(1, 800));
        assert_eq!(pick(&p, &ws), 0);
        for _ in 0..3 {
            p.observe(&outcome(0, OutcomeKind::ServerError, 50));
        }
        assert_eq!(pick(&p, &ws), 1);
    }

    #[test]
    fn closed_loop_converges_to_epsilon_share() {
        // Four workers with fixed speeds; each pick is answered at once. The fastest should end up
        // with the greedy share plus its part of exploration: 0.9 + 0.1 / 4 = 0.925.
        let p = Adaptive::new(AdaptiveConfig::default());
        let ws = views(4);
        let ttft = [400, 150, 300, 600];
        let mut rng = rng(11);
        let mut counts = [0usize; 4];
        for round in 0..12_000 {
            let i = p.select(&RequestFeatures::default(), &ws, &mut rng).unwrap();
            p.observe(&ok(ws[i].id, ttft[i]));
            if round >= 2000 {
                counts[i] += 1;
            }
        }
        let share = counts[1] as f64 / 10_000.0;
        assert!((share - 0.925).abs() < 0.015, "{counts:?}");
    }

    #[test]
    fn ties_between_equal_estimates_are_random() {
        let p = greedy();
        let ws = views(2);
        p.observe(&ok(0, 100));
        p.observe(&ok(1, 100));
        let mut rng = rng(4);
        let mut counts = [0; 2];
        for _ in 0..1000 {
            counts[p.select(&RequestFeatures::default(), &ws, &mut rng).unwrap()] += 1;
        }
        assert!(counts[0] > 400 && counts[1] > 400, "{counts:?}");
    }

    proptest! {
        #[test]
        fn never_out_of_range(
            n in 0u64..10,
            outcomes in prop::collection::vec((0u64..12, 0u64..3000, any::<bool>()), 0..30),
            epsilon in 0.0f64..=1.0,
            seed: u64,
        ) {
            let p = Adaptive::new(AdaptiveConfig { epsilon, learning_rate: 0.1 });
            for (w, ms, failed) in outcomes {
                let kind = if failed { OutcomeKind::ConnectError } else { OutcomeKind::Success };
                p.observe(&outcome(w, kind, ms));
            }
            let ws = views(n);
            let pick = p.select(&RequestFeatures::default(), &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            prop_assert!(pick.iter().all(|&i| i < ws.len()));
        }
    }

    #[test]
    fn a_burst_before_any_outcome_spreads_instead_of_piling_up() {
        let a = Adaptive::new(AdaptiveConfig { epsilon: 0.0, ..AdaptiveConfig::default() });
        let mut rng = rng(3);
        let req = RequestFeatures::default();
        let mut views: Vec<WorkerView> = (0..4).map(|id| WorkerView { id, weight: 1, ..Default::default() }).collect();
        // Learned: worker 0 is fastest, 3 slowest (but not failing).
        for (id, ttft) in [(0u64, 50u64), (1, 60), (2, 70), (3, 400)] {
            let t = std::time::Duration::from_millis(ttft);
            a.observe(&Outcome { output_tokens: 1, ..Outcome::new(id, OutcomeKind::Success, Some(t), t) });
        }
        // 40 picks before any of them finishes: in-flight grows with each pick.
        for _ in 0..40 {
            let i = a.select(&req, &views, &mut rng).unwrap();
            views[i].in_flight += 1;
        }
        let loads: Vec<u32> = views.iter().map(|v| v.in_flight).collect();
        assert!(loads[0] < 20, "no pile-up on the fastest worker: {loads:?}");
        assert!(loads[0] >= loads[1] && loads[1] >= loads[2] && loads[2] > loads[3], "faster gets more: {loads:?}");
    }
}
