//! `p2c_kv`: the power of two choices over a KV/queue/latency/error cost, plus prefix-cache affinity.
//!
//! # Two random choices
//! Sending every request to the least loaded worker needs a fresh, global view; with views a scrape
//! old, every request in a burst sees the same "least loaded" worker and they all herd onto it. Picking
//! one worker at random never herds but leaves queues uneven (the longest grows like `log n / log log n`).
//! Mitzenmacher's *power of two choices* draws two at random and keeps the better: the longest queue
//! falls to `log log n`, exponentially better than one choice, while the randomness still spreads a
//! burst. Each candidate's cost (lower is better) is
//!
//! ```text
//! w_waiting * waiting + w_running * running + w_kv * kv_usage
//!   + w_latency * ttft_ms / mean_ttft + w_error * error_rate
//!   - w_prefix * predicted_cached_fraction
//! ```
//!
//! where `mean_ttft` is the mean over candidates whose TTFT is known (a worker with unknown TTFT scores
//! 0 on that term), so the latency term is scale-free: 1.0 for an average worker.
//!
//! # Prefix affinity
//! vLLM reuses cached KV blocks for a prompt that starts like a recent one, which skips the prefill of
//! the shared part. The [`PrefixIndex`] predicts, per worker, the share of a request's prefix hashes that
//! worker holds; the cost subtracts `w_prefix` times that share.
//!
//! Pure p2c would throw most of that away: a long system prompt shared by all traffic is cached on the
//! worker(s) that served it, but two random draws include a given worker only `2/n` of the time, so with
//! 16 workers the cache would be hit on one request in eight. So besides the two random draws, the
//! comparison also includes the worker(s) holding the deepest match among the candidates, whenever
//! that match is non-empty. The cost then decides whether affinity is worth that worker's load: a full
//! match is worth `w_prefix` (3 by default) queued requests. New prefixes match nowhere, and fall back
//! to plain p2c, which spreads them.
//!
//! # Imbalance guard
//! Affinity can concentrate a popular prefix on one worker faster than the cost pushes back. When the
//! busiest candidate's load (`waiting + running`) exceeds the least busy by more than `imbalance_abs`
//! *and* is above `imbalance_rel` times it, every candidate loaded above `least + imbalance_abs` leaves
//! the candidate set for this pick. Among the candidates that remain, the same rule applies (two random
//! draws plus the deepest prefix match), so affinity is kept while the overloaded worker drains.

use crate::config::{P2cConfig, PrefixConfig};
use crate::policy::Policy;
use crate::prefix_index::PrefixIndex;
use gateway_core::{RequestFeatures, WorkerId, WorkerView};
use parking_lot::Mutex;
use rand::{Rng, RngCore};

/// Power of two choices with a KV-aware cost, a prefix-affinity credit and an imbalance guard.
#[derive(Debug)]
pub struct P2cKv {
    cfg: P2cConfig,
    index: Mutex<PrefixIndex>,
}

fn load(w: &WorkerView) -> u64 {
    u64::from(w.waiting) + u64::from(w.running)
}

impl P2cKv {
    /// A policy with these weights and a prefix index bounded by `prefix.max_entries`.
    pub fn new(cfg: P2cConfig, prefix: &PrefixConfig) -> Self {
        Self { cfg, index: Mutex::new(PrefixIndex::new(prefix.max_entries)) }
    }

    /// `(prefix hash, worker)` pairs the prefix index holds now, for metrics.
    pub fn entries(&self) -> usize {
        self.index.lock().entries()
    }

    /// The cost of `w` before the prefix credit (lower is better).
    fn base_cost(&self, w: &WorkerView, mean_ttft: f64) -> f64 {
        let c = &self.cfg;
        let latency = if mean_ttft > 0.0 && w.ttft_ms > 0.0 { w.ttft_ms / mean_ttft } else { 0.0 };
        c.w_waiting * f64::from(w.waiting)
            + c.w_running * f64::from(w.running)
            + c.w_kv * w.kv_usage
            + c.w_latency * latency
            + c.w_error * w.error_rate
    }
}

impl Policy for P2cKv {
    fn memory_entries(&self) -> usize {
        self.entries()
    }

    fn name(&self) -> &'static str {
        "p2c_kv"
    }

    fn select(&self, req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        let n = candidates.len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let (mut least, mut most) = (u64::MAX, 0u64);
        let (mut ttft_sum, mut ttft_known) = (0.0, 0u32);
        for w in candidates {
            let l = load(w);
            least = least.min(l);
            most = most.max(l);
            if w.ttft_ms > 0.0 {
                ttft_sum += w.ttft_ms;
                ttft_known += 1;
            }
        }
        let mean_ttft = if ttft_known > 0 { ttft_sum / f64::from(ttft_known) } else { 0.0 };
        let abs = u64::from(self.cfg.imbalance_abs);
        let imbalanced = most - least > abs && most as f64 > self.cfg.imbalance_rel * least as f64;
        let limit = if imbalanced { least + abs } else { u64::MAX };
        let allowed = |i: usize| load(&candidates[i]) <= limit;

        // Two distinct random draws among the allowed (the least loaded is always allowed).
        let (a, b) = if imbalanced {
            let pool: Vec<usize> = (0..n).filter(|&i| allowed(i)).collect();
            let (x, y) = two_distinct(pool.len(), rng);
            (pool[x], y.map(|y| pool[y]))
        } else {
            let (x, y) = two_distinct(n, rng);
            (x, y)
        };

        let hashes = &req.prefix_hashes;
        let use_prefix = self.cfg.w_prefix > 0.0 && !hashes.is_empty();
        let credit_per_hash = if use_prefix { self.cfg.w_prefix / hashes.len() as f64 } else { 0.0 };
        let cost_of =
            |i: usize, matched: usize| self.base_cost(&candidates[i], mean_ttft) - credit_per_hash * matched as f64;

        let index = self.index.lock();
        let matched = |i: usize| if use_prefix { index.match_len(candidates[i].id, hashes) } else { 0 };
        let mut best = (a, cost_of(a, matched(a)));
        let mut consider = |i: usize, cost: f64| {
            if cost < best.1 {
                best = (i, cost);
            }
        };
        if let Some(b) = b {
            consider(b, cost_of(b, matched(b)));
        }
        if use_prefix {
            let position = |id: WorkerId| candidates.iter().position(|w| w.id == id).filter(|&i| allowed(i));
            let (depth, holders) = index.deepest(hashes, |id| position(id).is_some());
            if depth > 0 {
                for i in holders.filter_map(position) {
                    consider(i, cost_of(i, depth));
                }
            }
        }
        Some(best.0)
    }

    fn on_dispatch(&self, req: &RequestFeatures, worker: WorkerId) {
        if self.cfg.w_prefix > 0.0 && !req.prefix_hashes.is_empty() {
            self.index.lock().record(&req.prefix_hashes, worker);
        }
    }

    fn forget(&self, worker: WorkerId) {
        self.index.lock().forget(worker);
    }
}

/// Two distinct indices in `0..n` drawn uniformly (`n >= 1`); the second is `None` when `n == 1`.
fn two_distinct(n: usize, rng: &mut dyn RngCore) -> (usize, Option<usize>) {
    let x = rng.random_range(0..n);
    if n == 1 {
        return (x, None);
    }
    let mut y = rng.random_range(0..n - 1);
    if y >= x {
        y += 1;
    }
    (x, Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{rng, views};
    use proptest::prelude::*;

    fn policy(cfg: P2cConfig) -> P2cKv {
        P2cKv::new(cfg, &PrefixConfig::default())
    }

    /// A request whose prompt is `shared` common hashes followed by `own` hashes unique to `tag`.
    fn req(shared: u64, own: u64, tag: u64) -> RequestFeatures {
        let mut hashes: Vec<u64> = (0..shared).map(|i| 1000 + i).collect();
        hashes.extend((0..own).map(|i| (tag << 32) + i));
        RequestFeatures { prefix_hashes: hashes, ..Default::default() }
    }

    fn counts(p: &P2cKv, r: &RequestFeatures, ws: &[WorkerView], draws: usize, seed: u64) -> Vec<usize> {
        let mut rng = rng(seed);
        let mut counts = vec![0; ws.len()];
        for _ in 0..draws {
            counts[p.select(r, ws, &mut rng).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn keeps_the_cheaper_of_two() {
        let p = policy(P2cConfig::default());
        let mut ws = views(2);
        ws[0].waiting = 3;
        ws[1].kv_usage = 0.9; // 1.8 < 3
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 1), [0, 100]);
        ws[1].error_rate = 0.5; // 1.8 + 2.5 > 3
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 1), [100, 0]);
    }

    #[test]
    fn latency_is_normalised_by_the_mean() {
        let p = policy(P2cConfig::default());
        let mut ws = views(2);
        (ws[0].ttft_ms, ws[1].ttft_ms) = (300.0, 100.0); // 0.3*1.5 vs 0.3*0.5
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 50, 2), [0, 50]);
        // Scale-free: the same ratio at 10x the latency gives the same costs.
        let (a, b) = (p.base_cost(&ws[0], 200.0), p.base_cost(&ws[1], 200.0));
        assert!((a - 0.45).abs() < 1e-9 && (b - 0.15).abs() < 1e-9);
        // Unknown latency scores 0 on that term.
        ws[0].ttft_ms = 0.0;
        assert_eq!(p.base_cost(&ws[0], 100.0), 0.0);
    }

    #[test]
    fn idle_equal_workers_share_evenly() {
        let p = policy(P2cConfig::default());
        let ws = views(4);
        let c = counts(&p, &RequestFeatures::default(), &ws, 4000, 3);
        assert!(c.iter().all(|&n| (800..1200).contains(&n)), "{c:?}");
    }

    #[test]
    fn same_prefix_follows_the_worker_that_has_it() {
        let p = policy(P2cConfig::default());
        let ws = views(16);
        p.on_dispatch(&req(30, 2, 1), 11);
        // Another conversation on the same 30-hash system prompt: pure p2c would find worker 11 in 2/16
        // of draws; with the best-prefix candidate it goes there every time.
        let c = counts(&p, &req(30, 2, 2), &ws, 200, 4);
        assert_eq!(c[11], 200, "{c:?}");
        assert_eq!(p.entries(), 32);
    }

    #[test]
    fn new_prefixes_spread() {
        let p = policy(P2cConfig::default());
        let mut ws = views(8);
        let mut rng = rng(5);
        let mut counts = [0usize; 8];
        for tag in 0..800 {
            let r = req(0, 8, tag);
            let i = p.select(&r, &ws, &mut rng).unwrap();
            p.on_dispatch(&r, ws[i].id);
            counts[i] += 1;
            ws[i].running += 1; // each request adds load; they stay running
        }
        assert!(counts.iter().all(|&n| (90..=110).contains(&n)), "{counts:?}");
    }

    #[test]
    fn affinity_gives_way_to_load() {
        let p = policy(P2cConfig::default());
        let mut ws = views(4);
        p.on_dispatch(&req(32, 0, 0), 0);
        ws[0].waiting = 10; // 10 - 3 = 7 > 0: a full match is worth only 3 queued requests
        let c = counts(&p, &req(32, 0, 0), &ws, 300, 6);
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn imbalance_guard_keeps_affinity_among_the_rest() {
        // Affinity strong enough to outweigh any load, so only the guard can move traffic.
        let p = policy(P2cConfig { w_prefix: 1000.0, ..P2cConfig::default() });
        let mut ws = views(4);
        let full = req(32, 0, 0);
        let mut half = full.clone();
        half.prefix_hashes.truncate(16);
        p.on_dispatch(&full, 0);
        p.on_dispatch(&half, 1);
        ws[0].waiting = 20;
        ws[1].waiting = 20;
        // Balanced enough (gap 20 <= 32): the full match on worker 0 wins.
        assert_eq!(counts(&p, &full, &ws, 100, 7), [100, 0, 0, 0]);
        // Worker 0 overloaded (100 > 0 + 32 and > 1.5 * 0): it leaves; worker 1 (20 <= 32) keeps the
        // best remaining match and still wins over the idle workers.
        ws[0].waiting = 100;
        assert_eq!(counts(&p, &full, &ws, 100, 7), [0, 100, 0, 0]);
        // Worker 1 overloaded too: only the idle workers remain and plain p2c spreads over them.
        ws[1].waiting = 40;
        let c = counts(&p, &full, &ws, 1000, 7);
        assert!(c[0] == 0 && c[1] == 0 && c[2] > 400 && c[3] > 400, "{c:?}");
        // The relative test matters too: 140 vs 100 is a gap above 32 but not 1.5x.
        for (w, l) in ws.iter_mut().zip([140, 100, 100, 100]) {
            w.waiting = l;
        }
        assert_eq!(counts(&p, &full, &ws, 100, 7), [100, 0, 0, 0]);
    }

    #[test]
    fn forget_drops_the_workers_prefixes() {
        let p = policy(P2cConfig::default());
        p.on_dispatch(&req(8, 0, 0), 3);
        p.on_dispatch(&req(8, 0, 0), 4);
        assert_eq!(p.entries(), 16);
        p.forget(3);
        assert_eq!(p.entries(), 8);
    }

    proptest! {
        #[test]
        fn never_out_of_range(
            loads in prop::collection::vec((0u32..80, 0u32..80, 0.0f64..1.0, 0.0f64..500.0), 0..12),
            history in prop::collection::vec((0u64..12, 0u64..6, 0u64..6), 0..20),
            shared in 0u64..6,
            seed: u64,
        ) {
            let p = P2cKv::new(P2cConfig::default(), &PrefixConfig { max_entries: 30 });
            for (worker, s, own) in history {
                p.on_dispatch(&req(s, own, worker), worker);
            }
            let ws: Vec<WorkerView> = loads
                .iter()
                .enumerate()
                .map(|(i, &(waiting, running, kv_usage, ttft_ms))| WorkerView {
                    id: i as u64 * 2,
                    waiting,
                    running,
                    kv_usage,
                    ttft_ms,
                    ..Default::default()
                })
                .collect();
            let pick = p.select(&req(shared, 2, 99), &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            prop_assert!(pick.iter().all(|&i| i < ws.len()));
            prop_assert!(p.entries() <= 30);
        }
    }
}
