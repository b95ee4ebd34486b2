//! `p2c_kv`: the power of two choices, ranked by each candidate's predicted time to first token.
//!
//! # Two random choices, plus the worker holding the prompt
//! Sending every request to the least loaded worker needs a fresh, global view; with views a scrape
//! old, every request in a burst sees the same "least loaded" worker and they all herd onto it. Picking
//! one worker at random never herds but leaves queues uneven (the longest grows like `log n / log log n`).
//! Mitzenmacher's *power of two choices* draws two at random and keeps the better: the longest queue
//! falls to `log log n`, exponentially better than one choice, while the randomness still spreads a
//! burst.
//!
//! Pure p2c would throw prefix caches away: two random draws include the worker holding a request's
//! prompt only `2/n` of the time. So the worker(s) holding the deepest match of the request's prefix
//! hashes ([`PrefixIndex`]) are always compared too. New prefixes match nowhere and fall back to plain
//! p2c, which spreads them.
//!
//! # Ranked by time, not by a sum of unitless terms
//! Each candidate's cost is this request's predicted time to first token on it
//! ([`crate::ttft_model`]): the wait for a batch slot at the worker's observed service rate, plus the
//! prefill of the part of this prompt the worker does not hold (per its cache model) at its observed
//! prefill rate, plus a barrier that rises steeply as its KV cache nears full. Queueing and prefill are
//! in the same unit, so the trade is priced, not weighted: under saturation every worker has a queue,
//! and the worker holding a 3 000-token prompt still wins until its extra wait exceeds the 300 ms of
//! prefill it saves; a hot prefix then spills to a second worker, which from then on holds it too
//! (a hot prefix may live on several workers, and both are compared).
//!
//! # A cache model per worker
//! The prefix index mirrors each worker's cache with its capacity ([`PrefixIndex::set_capacity`]),
//! evicting in LRU order as vLLM does, so a predicted hit is one the worker still holds. The capacity
//! comes, in this order, from the engine ([`WorkerView::cache_tokens`], e.g. vLLM's `cache_config_info`
//! `num_gpu_blocks * block_size`); else it is learned from what the worker reports cached: each finished
//! request compares the cached tokens the worker reported with the ones predicted at dispatch; a
//! predicted hit the worker did not have means the model holds more than the worker, so the capacity
//! shrinks 5%; a hit the model did not predict means it evicted too early, so it grows 5%. These
//! stochastic steps settle where over- and under-predictions balance. The learning starts from
//! `routing.prefix.cache_tokens` when configured, else from what the worker was sent so far. Over
//! everything the global bound `routing.prefix.max_entries` holds.
//!
//! # Bounded load
//! Affinity can still concentrate a popular prefix on one worker faster than stale load views push
//! back. When the busiest candidate's load (`waiting + running`) exceeds the least busy by more than
//! `imbalance_abs` *and* is above `imbalance_rel` times it (sglang-router's balance thresholds), every
//! candidate loaded above `least + imbalance_abs` leaves the candidate set for this pick. Among those
//! that remain the same rule applies (two draws plus the deepest match), so affinity is kept while the
//! overloaded worker drains.
//!
//! # What the gateway feeds it
//! - [`WorkerView`] per pick: `running`, `waiting`, `kv_usage` from the worker's last scrape;
//!   `max_running` = its slot capacity (0 when unlimited or unknown); `cache_tokens` = the engine's cache
//!   size when it reports one (vLLM's `vllm:cache_config_info{num_gpu_blocks, block_size}`, SGLang's
//!   `sglang:max_total_num_tokens`), else 0; `ttft_ms` and `error_rate` (the TTFT average is the model's
//!   prior until it has points of its own).
//! - [`Policy::on_dispatch`] returns the prompt tokens predicted cached on the chosen worker; the request's
//!   record carries it into [`Outcome::predicted_cached_tokens`].
//! - [`Outcome`] at the request's end: `prompt_tokens` from the worker's `usage` (else the gateway's
//!   estimate); `cached_tokens` from `usage.prompt_tokens_details.cached_tokens` when the worker reports
//!   it (vLLM with `--enable-prompt-tokens-details`; vllm-sim always); `ttft` for streams only (a
//!   non-streamed body's first byte is its end). Without `cached_tokens` the capacity is not learned;
//!   without token counts the prefill rate keeps its prior.
//! - Admission hand-off: under saturation every request waits in the gateway's queue and the worker
//!   whose slot frees first takes one, so the hand-off decides where requests run. A waiter holds a
//!   closure over its features and the policy; when worker W frees a slot, the queue asks
//!   [`Policy::prefill_time`] for W and for the waiter's other workers (the prefill of the part of its
//!   prompt each does not hold, at each one's learned prefill rate): a waiter another worker holds may
//!   hold out for it while that worker's line is shorter than the prefill it would save, and of the
//!   rest the one whose wait, less W's prefill of it (times `queue.prefill_weight`, 2 by default), is
//!   longest goes first: what W's cache saves counts as time already waited
//!   (`guard::AdmissionQueue::pop_preferring`).
//!   The policy's lock is taken inside the queue's and never the other way round.

use crate::config::{P2cConfig, PrefixConfig};
use crate::policy::Policy;
use crate::prefix_index::PrefixIndex;
use crate::ttft_model::{expected_ttft_ms, Priors, WorkerRates};
use crate::util::IdMap;
use gateway_core::{Outcome, OutcomeKind, RequestFeatures, WorkerId, WorkerView};
use parking_lot::Mutex;
use rand::{Rng, RngCore};

/// Step of the learned cache capacity per mispredicted request.
const CAPACITY_STEP: f64 = 0.05;
/// Tokens of one vLLM KV block: a prediction off by less than a block and a chunk is not a miss.
const BLOCK_TOKENS: u64 = 16;
/// Largest prefill a hand-off counts, seconds: bounds how long a waiter may hold out for its worker.
const MAX_PREFILL_SECS: f64 = 10.0;
/// Predicted times closer than this, ms, count as equal (then load decides).
const TIE_MS: f64 = 1.0;
/// Workers holding the deepest match that are compared besides the two random draws.
const MAX_HOLDERS: usize = 8;

/// Power of two choices ranked by predicted TTFT, with prefix-cache affinity and an imbalance guard.
#[derive(Debug)]
pub struct P2cKv {
    cfg: P2cConfig,
    priors: Priors,
    /// Starting cache capacity of a worker the engine says nothing about, tokens (0: unknown).
    default_cache_tokens: u64,
    state: Mutex<State>,
}

/// Everything learned, behind one lock so a pick reads it in one critical section.
#[derive(Debug)]
struct State {
    index: PrefixIndex,
    workers: IdMap<WorkerId, WorkerModel>,
    /// Estimated tokens per prefix hash (from the requests' chunk size).
    chunk_tokens: u64,
}

#[derive(Debug, Default)]
struct WorkerModel {
    rates: WorkerRates,
    /// Cache capacity the engine reported, tokens; 0 when it did not (then the capacity is learned).
    engine_cache_tokens: u64,
}

fn load(w: &WorkerView) -> u64 {
    u64::from(w.waiting) + u64::from(w.running)
}

impl State {
    /// Applies a capacity the engine reports for `w` (only when it changed: a pick stays cheap);
    /// whether it changed.
    fn sync_capacity(&mut self, w: &WorkerView) -> bool {
        if w.cache_tokens == 0 {
            return false;
        }
        let Some(m) = self.workers.get_mut(&w.id) else { return false };
        if m.engine_cache_tokens == w.cache_tokens {
            return false;
        }
        m.engine_cache_tokens = w.cache_tokens;
        let entries = w.cache_tokens / self.chunk_tokens.max(1);
        self.index.set_capacity(w.id, Some(usize::try_from(entries).unwrap_or(usize::MAX).max(1)));
        true
    }

    /// Learns the capacity of a worker without an engine-reported one from one request's cache report.
    ///
    /// A miss is a misprediction by more than half (tolerant of the gateway's 4-characters-per-token
    /// estimate against the engine's tokenizer) and by more than a chunk and a block (the granularity
    /// of both).
    fn learn_capacity(&mut self, worker: WorkerId, predicted: u32, actual: u32) {
        let slack = self.chunk_tokens + BLOCK_TOKENS;
        let (predicted, actual) = (u64::from(predicted), u64::from(actual));
        let held = self.index.held(worker);
        let current = self.index.capacity_of(worker);
        let next = if predicted > slack && actual < predicted / 2 {
            // Predicted a hit the worker no longer had: it holds less than the model does now.
            let from = current.unwrap_or(held).min(held.max(1));
            Some(((from as f64) * (1.0 - CAPACITY_STEP)).floor().max(1.0) as usize)
        } else if actual > slack && predicted < actual / 2 {
            // A hit the model had evicted: it holds more. Unknown stays unknown (nothing to grow).
            current.map(|c| (((c as f64) * (1.0 + CAPACITY_STEP)).ceil() as usize + 1).min(self.index.capacity()))
        } else {
            return;
        };
        if next != current {
            self.index.set_capacity(worker, next);
        }
    }
}

impl P2cKv {
    /// A policy with these priors and a prefix index bounded by `prefix.max_entries`.
    pub fn new(cfg: P2cConfig, prefix: &PrefixConfig) -> Self {
        let state = State { index: PrefixIndex::new(prefix.max_entries), workers: IdMap::default(), chunk_tokens: 32 };
        Self { priors: cfg.priors(), cfg, default_cache_tokens: prefix.cache_tokens, state: Mutex::new(state) }
    }

    /// The worker's modelled cache capacity in tokens, `None` when unknown (for tests and the admin API).
    pub fn cache_capacity_tokens(&self, worker: WorkerId) -> Option<u64> {
        let st = self.state.lock();
        st.index.capacity_of(worker).map(|c| c as u64 * st.chunk_tokens)
    }

    /// Prompt tokens of `req` the model predicts `worker` holds, for tests and diagnostics.
    pub fn predicted_cached_tokens(&self, req: &RequestFeatures, worker: WorkerId) -> u64 {
        let matched = self.state.lock().index.match_len(worker, &req.prefix_hashes);
        req.tokens_in_hashes(matched)
    }

    /// Predicted TTFT, ms, of `req` on `w` now (what `select` ranks by), for tests and diagnostics.
    pub fn predicted_ttft_ms(&self, req: &RequestFeatures, w: &WorkerView) -> f64 {
        let mut st = self.state.lock();
        st.sync_capacity(w);
        let matched = st.index.match_len(w.id, &req.prefix_hashes);
        let rates = st.workers.get(&w.id).map(|m| &m.rates);
        self.cost(req, w, rates, matched)
    }

    fn cost(&self, req: &RequestFeatures, w: &WorkerView, rates: Option<&WorkerRates>, matched: usize) -> f64 {
        let uncached = req.prompt_tokens().saturating_sub(req.tokens_in_hashes(matched));
        let default = WorkerRates::default();
        expected_ttft_ms(w, rates.unwrap_or(&default), &self.priors, uncached as f64)
    }
}

impl Policy for P2cKv {
    fn memory_entries(&self) -> usize {
        self.state.lock().index.entries()
    }

    fn name(&self) -> &'static str {
        "p2c_kv"
    }

    fn uses_session_key(&self) -> bool {
        false
    }

    fn select(&self, req: &RequestFeatures, candidates: &[WorkerView], rng: &mut dyn RngCore) -> Option<usize> {
        let n = candidates.len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let (mut least, mut most) = (u64::MAX, 0u64);
        for w in candidates {
            let l = load(w);
            least = least.min(l);
            most = most.max(l);
        }
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
            two_distinct(n, rng)
        };

        let hashes = &req.prefix_hashes;
        let mut st = self.state.lock();
        // The deepest holders among the allowed, found before any capacity sync may evict (a holder's
        // own match is re-read after its sync below).
        let mut holders = [usize::MAX; MAX_HOLDERS];
        let mut n_holders = 0;
        let mut depth = 0;
        if !hashes.is_empty() {
            let position = |id: WorkerId| candidates.iter().position(|w| w.id == id).filter(|&i| allowed(i));
            let (d, ids) = st.index.deepest(hashes, |id| position(id).is_some());
            depth = d;
            if depth > 0 {
                for i in ids.filter_map(position).take(MAX_HOLDERS) {
                    holders[n_holders] = i;
                    n_holders += 1;
                }
            }
        }
        let draws = [Some(a), b].into_iter().flatten().map(|i| (i, false));
        let mut best = (a, f64::INFINITY);
        for (i, holder) in draws.chain(holders[..n_holders].iter().map(|&i| (i, true))) {
            let w = &candidates[i];
            let resized = st.sync_capacity(w);
            let matched = match (hashes.is_empty(), holder && !resized) {
                (true, _) => 0,
                (false, true) => depth,
                (false, false) => st.index.match_len(w.id, hashes),
            };
            let cost = self.cost(req, w, st.workers.get(&w.id).map(|m| &m.rates), matched);
            // Within `TIE_MS` the model cannot tell them apart: the less loaded wins (p2c's balance),
            // then the first random draw (which keeps exact ties random).
            let better = cost < best.1 - TIE_MS || (cost <= best.1 + TIE_MS && load(w) < load(&candidates[best.0]));
            if better {
                best = (i, cost);
            }
        }
        Some(best.0)
    }

    fn prefill_time(&self, req: &RequestFeatures, worker: WorkerId) -> std::time::Duration {
        let st = self.state.lock();
        let cached = req.tokens_in_hashes(st.index.match_len(worker, &req.prefix_hashes));
        let uncached = req.prompt_tokens().saturating_sub(cached) as f64;
        // At the worker's learned prefill rate (the slope of its TTFT against uncached tokens).
        let default = WorkerRates::default();
        let rates = st.workers.get(&worker).map_or(&default, |m| &m.rates);
        let (_, per_token) = rates.line(&self.priors, 0.0);
        std::time::Duration::from_secs_f64((uncached * per_token / 1000.0).clamp(0.0, MAX_PREFILL_SECS))
    }

    fn on_dispatch(&self, req: &RequestFeatures, worker: WorkerId) -> Option<u32> {
        let mut st = self.state.lock();
        if req.chunk_bytes > 0 {
            st.chunk_tokens = (req.chunk_bytes as u64).div_ceil(4).max(1);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = st.workers.entry(worker) {
            slot.insert(WorkerModel::default());
            if self.default_cache_tokens > 0 {
                let entries = self.default_cache_tokens / st.chunk_tokens;
                st.index.set_capacity(worker, Some(usize::try_from(entries).unwrap_or(usize::MAX).max(1)));
            }
        }
        let matched = st.index.match_len(worker, &req.prefix_hashes);
        if !req.prefix_hashes.is_empty() {
            st.index.record(&req.prefix_hashes, worker);
        }
        Some(u32::try_from(req.tokens_in_hashes(matched)).unwrap_or(u32::MAX))
    }

    fn observe(&self, outcome: &Outcome) {
        let alpha = self.priors.alpha;
        let mut st = self.state.lock();
        // Only workers still in the fleet (dispatched to, not forgotten) keep a model.
        let Some(m) = st.workers.get_mut(&outcome.worker) else { return };
        if outcome.kind == OutcomeKind::Success {
            m.rates.observe_service(outcome.latency.as_secs_f64() * 1000.0, alpha);
            if let (Some(ttft), Some(uncached)) = (outcome.ttft, outcome.uncached_tokens()) {
                m.rates.observe_ttft(f64::from(uncached), ttft.as_secs_f64() * 1000.0, alpha);
            }
        }
        let learn = m.engine_cache_tokens == 0;
        if let (true, Some(actual), Some(predicted)) = (learn, outcome.cached_tokens, outcome.predicted_cached_tokens) {
            st.learn_capacity(outcome.worker, predicted, actual);
        }
    }

    fn forget(&self, worker: WorkerId) {
        let mut st = self.state.lock();
        st.index.forget(worker);
        st.workers.remove(&worker);
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
    use rand::Rng;
    use std::time::Duration;

    fn policy(cfg: P2cConfig) -> P2cKv {
        P2cKv::new(cfg, &PrefixConfig::default())
    }

    /// A request whose prompt is `shared` common hashes followed by `own` hashes unique to `tag`, at the
    /// default 128-byte chunks (32 tokens per hash).
    fn req(shared: u64, own: u64, tag: u64) -> RequestFeatures {
        let mut hashes: Vec<u64> = (0..shared).map(|i| 1000 + i).collect();
        hashes.extend((0..own).map(|i| (tag << 32) + i));
        RequestFeatures {
            prompt_chars: hashes.len() * 128,
            prefix_hashes: hashes,
            chunk_bytes: 128,
            ..Default::default()
        }
    }

    fn counts(p: &P2cKv, r: &RequestFeatures, ws: &[WorkerView], draws: usize, seed: u64) -> Vec<usize> {
        let mut rng = rng(seed);
        let mut counts = vec![0; ws.len()];
        for _ in 0..draws {
            counts[p.select(r, ws, &mut rng).unwrap()] += 1;
        }
        counts
    }

    /// A finished streamed request on `worker`.
    fn done(worker: WorkerId, ttft_ms: u64, prompt: u32, cached: Option<u32>, predicted: Option<u32>) -> Outcome {
        Outcome {
            prompt_tokens: prompt,
            cached_tokens: cached,
            predicted_cached_tokens: predicted,
            output_tokens: 50,
            ..Outcome::new(worker, OutcomeKind::Success, Some(Duration::from_millis(ttft_ms)), Duration::from_secs(2))
        }
    }

    #[test]
    fn keeps_the_faster_of_two() {
        let p = policy(P2cConfig::default());
        let mut ws = views(2);
        for w in &mut ws {
            w.max_running = 8;
        }
        // Worker 0: 8 running, 2 queued: 3 slots to free at 2 s / 8 each = 750 ms.
        (ws[0].running, ws[0].waiting) = (8, 2);
        // Worker 1: KV at 95%: half a service time (1 s) of barrier.
        ws[1].kv_usage = 0.95;
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 1), [100, 0]);
        // At 92% the barrier is 100 ms: worker 1 is now the faster.
        ws[1].kv_usage = 0.92;
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 1), [0, 100]);
        // Errors stretch the expected time: 50% failures double a 600 ms TTFT (1.2 s > 750 ms).
        (ws[1].error_rate, ws[1].kv_usage, ws[1].ttft_ms) = (0.5, 0.0, 600.0);
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 1), [100, 0]);
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
        assert_eq!(p.on_dispatch(&req(30, 2, 1), 11), Some(0), "nothing cached before");
        // Another conversation on the same 30-hash system prompt: pure p2c would find worker 11 in 2/16
        // of draws; with the best-prefix candidate it goes there every time (960 tokens of prefill saved).
        let c = counts(&p, &req(30, 2, 2), &ws, 200, 4);
        assert_eq!(c[11], 200, "{c:?}");
        assert_eq!(p.memory_entries(), 32);
        assert_eq!(p.on_dispatch(&req(30, 2, 2), 11), Some(30 * 32), "the prediction handed to the outcome");
        assert_eq!(p.predicted_cached_tokens(&req(30, 5, 3), 11), 30 * 32);
        // The hand-off's fit: the prefill of the tokens a worker does not hold, at the prior rate until
        // the worker's own is learned: 5 hashes on worker 11, all 35 on worker 12, which holds nothing.
        let per_token = P2cConfig::default().priors().prefill_ms_per_token;
        let ms = |w| p.prefill_time(&req(30, 5, 3), w).as_secs_f64() * 1000.0;
        assert!((ms(11) - 5.0 * 32.0 * per_token).abs() < 0.01, "{}", ms(11));
        assert!((ms(12) - 35.0 * 32.0 * per_token).abs() < 0.01, "{}", ms(12));
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

    /// The failure: under saturation every worker queues, and a unitless load term always beat
    /// affinity. In time, the holder wins while its extra wait is below the prefill it saves.
    #[test]
    fn affinity_beats_queueing_until_the_wait_costs_more_than_the_prefill() {
        let p = policy(P2cConfig::default());
        let mut ws = views(4);
        for w in &mut ws {
            (w.max_running, w.running, w.waiting) = (8, 8, 2); // 750 ms of slot wait each
        }
        let long = req(128, 0, 0); // 4 096 tokens: 410 ms of prefill at the prior rate
        p.on_dispatch(&long, 2);
        ws[2].waiting = 3; // 1 000 ms < 750 + 410
        assert_eq!(counts(&p, &long, &ws, 200, 6), [0, 0, 200, 0]);
        ws[2].waiting = 4; // 1 250 ms > 1 160 ms: the prefill is now the cheaper wait
        assert_eq!(counts(&p, &long, &ws, 200, 6)[2], 0);
    }

    #[test]
    fn a_hot_prefix_spills_and_then_lives_on_both_workers() {
        let p = policy(P2cConfig::default());
        let mut ws = views(4);
        for w in &mut ws {
            w.max_running = 4;
        }
        let hot = |tag| req(64, 1, tag); // 2 080 tokens: 208 ms cold
        p.on_dispatch(&hot(0), 0);
        ws[0].running = 4; // full: 500 ms to a slot > 208 ms of prefill elsewhere
        let mut rng = rng(8);
        let i = p.select(&hot(1), &ws, &mut rng).unwrap();
        assert_ne!(i, 0);
        p.on_dispatch(&hot(1), ws[i].id);
        // Now two workers hold it: whichever has room wins, never a cold one.
        let c = counts(&p, &hot(2), &ws, 200, 9);
        assert_eq!(c[i], 200, "{c:?}");
        ws[0].running = 0;
        ws[i].running = 4;
        let c = counts(&p, &hot(3), &ws, 200, 9);
        assert_eq!(c[0], 200, "{c:?}");
    }

    #[test]
    fn the_kv_barrier_steers_away_from_a_nearly_full_holder() {
        let p = policy(P2cConfig::default());
        let mut ws = views(4);
        p.on_dispatch(&req(32, 0, 0), 1);
        ws[1].kv_usage = 0.97; // barrier 2 s * 0.49 / 0.3 = 3.3 s > 102 ms of prefill
        let c = counts(&p, &req(32, 0, 0), &ws, 300, 10);
        assert_eq!(c[1], 0, "{c:?}");
        ws[1].kv_usage = 0.91; // 2 s * 0.01 / 0.9 = 22 ms < 102 ms
        assert_eq!(counts(&p, &req(32, 0, 0), &ws, 300, 10)[1], 300);
    }

    #[test]
    fn learned_prefill_rates_send_long_cold_prompts_to_the_faster_worker() {
        let p = policy(P2cConfig::default());
        let ws = views(2);
        for w in 0..2 {
            p.on_dispatch(&req(0, 1, w), w);
        }
        // Worker 0 prefills at 1 ms per token, worker 1 at 0.1 (both 30 ms fixed); the gateway reports
        // each request's prompt and the worker's own cached count.
        for i in 0..40u32 {
            let u = (i % 8) * 500;
            p.observe(&done(0, u64::from(30 + u), u + 100, Some(100), Some(0)));
            p.observe(&done(1, u64::from(30 + u / 10), u + 100, Some(100), Some(0)));
        }
        let cold = req(0, 64, 99); // 2 048 tokens
        assert!((p.predicted_ttft_ms(&cold, &ws[0]) - 2_078.0).abs() < 1.0);
        assert!((p.predicted_ttft_ms(&cold, &ws[1]) - 234.8).abs() < 1.0);
        assert_eq!(counts(&p, &cold, &ws, 100, 11), [0, 100]);
        // A short prompt costs about the same on both: then load decides.
        let mut ws = ws;
        ws[1].running = 3;
        assert_eq!(counts(&p, &RequestFeatures::default(), &ws, 100, 11), [100, 0]);
    }

    #[test]
    fn the_engines_capacity_bounds_the_predicted_hits() {
        let p = policy(P2cConfig::default());
        let mut ws = views(4);
        let (a, b) = (req(8, 0, 0), req(0, 8, 1));
        p.on_dispatch(&a, 3);
        p.on_dispatch(&b, 3);
        assert_eq!(p.predicted_cached_tokens(&a, 3), 256);
        // vLLM says worker 3 holds 320 tokens (10 chunks): `a`, the least recent, is mostly gone.
        ws[3].cache_tokens = 320;
        p.predicted_ttft_ms(&a, &ws[3]);
        assert_eq!(p.cache_capacity_tokens(3), Some(320));
        assert_eq!((p.predicted_cached_tokens(&a, 3), p.predicted_cached_tokens(&b, 3)), (2 * 32, 256));
        // So `a` no longer sticks to worker 3 for want of a cache that is not there.
        p.on_dispatch(&req(0, 8, 2), 3);
        assert_eq!(p.predicted_cached_tokens(&a, 3), 0);
        let c = counts(&p, &a, &ws, 400, 12);
        assert!(c.iter().all(|&n| n > 50), "{c:?}");
        // An engine-reported capacity is not second-guessed by the hit reports.
        p.observe(&done(3, 100, 256, Some(0), Some(256)));
        assert_eq!(p.cache_capacity_tokens(3), Some(320));
    }

    /// The worker's real cache is a 40-chunk LRU the policy cannot see; the policy learns a capacity
    /// from the cached counts the worker reports against its own predictions.
    #[test]
    fn the_capacity_is_learned_from_reported_hits() {
        let p = policy(P2cConfig::default());
        let mut engine = PrefixIndex::new(1_000);
        engine.set_capacity(0, Some(40));
        let mut rng = rng(13);
        for _ in 0..3_000 {
            let r = req(0, 8, rng.random_range(0..10)); // 10 prompts of 8 chunks; the cache holds 5
            let predicted = p.on_dispatch(&r, 0);
            let actual = r.tokens_in_hashes(engine.match_len(0, &r.prefix_hashes)) as u32;
            engine.record(&r.prefix_hashes, 0);
            p.observe(&done(0, 100, 256, Some(actual), predicted));
        }
        let learned = p.cache_capacity_tokens(0).expect("learned") / 32;
        assert!((32..=48).contains(&learned), "learned {learned} chunks, true 40");
        // And then the predictions are mostly right.
        let (mut right, mut total) = (0, 0);
        for _ in 0..500 {
            let r = req(0, 8, rng.random_range(0..10));
            let predicted = p.on_dispatch(&r, 0).unwrap_or(0) > 0;
            let actual = engine.match_len(0, &r.prefix_hashes) > 0;
            engine.record(&r.prefix_hashes, 0);
            right += usize::from(predicted == actual);
            total += 1;
        }
        assert!(right * 10 >= total * 8, "{right}/{total}");
    }

    #[test]
    fn a_configured_cache_size_is_where_learning_starts() {
        let p = P2cKv::new(P2cConfig::default(), &PrefixConfig { cache_tokens: 3_200, ..PrefixConfig::default() });
        p.on_dispatch(&req(0, 1, 0), 5);
        assert_eq!(p.cache_capacity_tokens(5), Some(3_200));
        // One predicted hit the worker did not have: 5% less, from what the model held (1 chunk) at most.
        p.on_dispatch(&req(0, 8, 1), 5);
        p.observe(&done(5, 100, 256, Some(0), Some(256)));
        assert_eq!(p.cache_capacity_tokens(5), Some(8 * 32));
        // Hits it did not predict grow it again.
        p.observe(&done(5, 100, 256, Some(256), Some(0)));
        assert_eq!(p.cache_capacity_tokens(5), Some(10 * 32));
    }

    #[test]
    fn imbalance_guard_keeps_affinity_among_the_rest() {
        // Prefill so expensive that affinity outweighs any queue, so only the guard can move traffic.
        let p = policy(P2cConfig { prefill_ms_per_1k_tokens: 1e6, ..P2cConfig::default() });
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
    fn forget_drops_the_workers_prefixes_and_rates() {
        let p = policy(P2cConfig::default());
        p.on_dispatch(&req(8, 0, 0), 3);
        p.on_dispatch(&req(8, 0, 0), 4);
        assert_eq!(p.memory_entries(), 16);
        p.forget(3);
        assert_eq!(p.memory_entries(), 8);
        // Late outcomes of a forgotten worker leave nothing behind.
        p.observe(&done(3, 100, 256, Some(0), Some(256)));
        assert!(!p.state.lock().workers.contains_key(&3));
    }

    proptest! {
        #[test]
        fn never_out_of_range(
            loads in prop::collection::vec((0u32..80, 0u32..80, 0.0f64..1.0, 0.0f64..500.0, 0u32..16, 0u64..2_000), 0..12),
            history in prop::collection::vec((0u64..12, 0u64..6, 0u64..6, 0u32..300, 0u32..300), 0..20),
            shared in 0u64..6,
            seed: u64,
        ) {
            let p = P2cKv::new(P2cConfig::default(), &PrefixConfig { max_entries: 30, cache_tokens: 0 });
            for (worker, s, own, cached, predicted) in history {
                p.on_dispatch(&req(s, own, worker), worker);
                p.observe(&done(worker, u64::from(cached), 300, Some(cached), Some(predicted)));
            }
            let ws: Vec<WorkerView> = loads
                .iter()
                .enumerate()
                .map(|(i, &(waiting, running, kv_usage, ttft_ms, max_running, cache_tokens))| WorkerView {
                    id: i as u64 * 2,
                    waiting,
                    running,
                    kv_usage,
                    ttft_ms,
                    max_running,
                    cache_tokens,
                    ..Default::default()
                })
                .collect();
            let pick = p.select(&req(shared, 2, 99), &ws, &mut rng(seed));
            prop_assert_eq!(pick.is_none(), ws.is_empty());
            prop_assert!(pick.iter().all(|&i| i < ws.len()));
            prop_assert!(p.memory_entries() <= 30);
            for w in &ws {
                prop_assert!(p.predicted_ttft_ms(&req(shared, 2, 99), w).is_finite());
            }
        }
    }
}
