//! The time-to-first-token model behind `p2c_kv`: what one request would wait for on one worker.
//!
//! # The prediction
//! For a request whose prompt the worker holds all but `u` tokens of (per the prefix index), on a worker
//! with `r` requests running in `s` batch slots and `q` waiting in its own queue:
//!
//! ```text
//! ttft = slot_wait + base + u * prefill_per_token + kv_barrier,   then / (1 - error_rate)
//! slot_wait  = (r + q + 1 - s)+ * service / s          one slot frees every service/s on average
//! kv_barrier = service * x^2 / (1 - x),   x = (kv_usage - knee)+ / (1 - knee)
//! ```
//!
//! - **slot_wait**: a continuous-batching engine runs at most `s` requests (`max_num_seqs`); beyond
//!   them a request queues until running ones finish. With `s` slots each busy for `service` (a request's
//!   whole latency), a slot frees every `service / s`, so `k` requests ahead cost `k * service / s`.
//!   When `s` is unknown the worker's own queue is the signal: `q` ahead (plus this one), slots freeing at
//!   `r / service`.
//! - **base + u · prefill_per_token**: the worker's own time to first token as a line in the tokens it
//!   must prefill. Cached tokens are free (that is what prefix caching buys), so the uncached part is
//!   what a cache-aware pick saves, in milliseconds, comparable with queueing at last.
//! - **kv_barrier**: near a full KV cache a new prompt waits for blocks, or running requests are
//!   preempted and recomputed. Zero below `knee`, one `service` at `x = 0.62`, ten at `x = 0.92`, and
//!   without bound as usage reaches 1, so no choice drives a worker into preemption while another has room.
//! - **error_rate**: a failed attempt is retried elsewhere, so the expected time to a good first token
//!   grows as `1 / (1 - p)` (capped at `p = 0.9`).
//!
//! # Learning the rates
//! Each finished request on a worker yields a point `(uncached prompt tokens, TTFT)`: the uncached size
//! is the prompt less what the worker reported cached (`usage.prompt_tokens_details.cached_tokens`), else
//! less what the prefix index predicted at dispatch. [`WorkerRates`] fits `ttft = base + slope * u` by
//! exponentially weighted least squares (sums of `1, u, t, u², u·t`, each decayed by `1 - alpha` per
//! point, so a worker that slows down is followed within about `1 / alpha` requests). The slope is the
//! prefill rate; until the points spread in `u` (variance below one chunk²) the slope stays at the prior
//! and only the base is fitted. `service` is an EWMA of request latency. Before any data the rates are
//! priors: the gateway's EWMA of the worker's TTFT when it has one, else the configured base and prefill
//! rate. The model keeps no clock: it learns per request, not per second, so tests feed points directly.
//!
//! # Sources and what we took
//! - Dynamo's KV router scores `overlap_weight * prefill_blocks + decode_blocks`: prefill work that
//!   the cache does not cover, plus load, in one unit (blocks). We use time instead of blocks so that
//!   slow and fast workers compare, and learn the per-worker rates instead of a global weight.
//! - sglang-router's `cache_aware` goes to the longest prefix match unless the fleet is imbalanced
//!   (`max - min > abs && max > rel * min`), then to the shortest queue. We keep that guard as the
//!   bounded-load safety net (`imbalance_abs`, `imbalance_rel`), and let the cost decide in between.
//! - llm-d's scheduler adds weighted scores (queue, KV utilisation, prefix); its scores are unitless
//!   like our old cost, which is the failure the issue measured: under saturation every queue is long
//!   and load outweighs affinity. Time is the common unit that removes the weights.

use gateway_core::WorkerView;

/// Priors and learning rate of the model (from `[routing.p2c]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Priors {
    /// Fixed part of the time to first token, ms, until learned.
    pub base_ms: f64,
    /// Prefill cost, ms per uncached prompt token, until learned.
    pub prefill_ms_per_token: f64,
    /// A request's latency (dispatch to end), ms, until learned.
    pub service_ms: f64,
    /// KV usage where the barrier starts, `0..1`.
    pub kv_knee: f64,
    /// Weight of each new point in the fit and the service EWMA, `(0, 1]`.
    pub alpha: f64,
}

impl Default for Priors {
    fn default() -> Self {
        Self { base_ms: 50.0, prefill_ms_per_token: 0.1, service_ms: 2_000.0, kv_knee: 0.9, alpha: 0.05 }
    }
}

/// Points of decayed weight needed before the fit replaces the priors.
const MIN_WEIGHT: f64 = 3.0;
/// Variance of `u` (tokens²) needed before the slope is fitted: the points must spread over a chunk.
const MIN_SPREAD: f64 = 32.0 * 32.0;

/// One worker's learned rates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerRates {
    /// Decayed sums of 1, u, t, u², u·t over the points.
    w: f64,
    su: f64,
    st: f64,
    suu: f64,
    sut: f64,
    /// EWMA of request latency, ms; 0 until the first.
    service_ms: f64,
}

impl WorkerRates {
    /// Adds a finished request's point: `uncached` prompt tokens took `ttft_ms` to the first token.
    pub fn observe_ttft(&mut self, uncached: f64, ttft_ms: f64, alpha: f64) {
        if !(uncached.is_finite() && ttft_ms.is_finite() && uncached >= 0.0 && ttft_ms >= 0.0) {
            return;
        }
        let keep = 1.0 - alpha;
        self.w = self.w * keep + 1.0;
        self.su = self.su * keep + uncached;
        self.st = self.st * keep + ttft_ms;
        self.suu = self.suu * keep + uncached * uncached;
        self.sut = self.sut * keep + uncached * ttft_ms;
    }

    /// Adds a finished request's whole latency, ms.
    pub fn observe_service(&mut self, latency_ms: f64, alpha: f64) {
        if !(latency_ms.is_finite() && latency_ms >= 0.0) {
            return;
        }
        self.service_ms =
            if self.service_ms == 0.0 { latency_ms } else { self.service_ms + alpha * (latency_ms - self.service_ms) };
    }

    /// `(base ms, ms per uncached token)`: the fit once there are points, else the priors (the
    /// gateway's TTFT EWMA `view_ttft_ms` standing in for the base when known).
    pub fn line(&self, p: &Priors, view_ttft_ms: f64) -> (f64, f64) {
        let prior_base = if view_ttft_ms > 0.0 { view_ttft_ms } else { p.base_ms };
        if self.w < MIN_WEIGHT {
            return (prior_base, p.prefill_ms_per_token);
        }
        let (mu, mt) = (self.su / self.w, self.st / self.w);
        let var = self.suu / self.w - mu * mu;
        let slope =
            if var >= MIN_SPREAD { ((self.sut / self.w - mu * mt) / var).max(0.0) } else { p.prefill_ms_per_token };
        ((mt - slope * mu).max(0.0), slope)
    }

    /// A request's latency, ms: learned, else the prior.
    pub fn service_ms(&self, p: &Priors) -> f64 {
        if self.service_ms > 0.0 {
            self.service_ms
        } else {
            p.service_ms
        }
    }
}

/// Predicted time to first token, ms, of a request with `uncached` prompt tokens on worker `w`.
pub fn predict_ttft_ms(w: &WorkerView, rates: &WorkerRates, p: &Priors, uncached: f64) -> f64 {
    let service = rates.service_ms(p);
    let (base, per_token) = rates.line(p, w.ttft_ms);
    slot_wait_ms(w, service) + base + uncached * per_token + kv_barrier_ms(w.kv_usage, p.kv_knee, service)
}

/// The time-to-first-token prediction, stretched for retries after failures: `/ (1 - error_rate)`.
pub fn expected_ttft_ms(w: &WorkerView, rates: &WorkerRates, p: &Priors, uncached: f64) -> f64 {
    predict_ttft_ms(w, rates, p, uncached) / (1.0 - w.error_rate.clamp(0.0, 0.9))
}

/// Waiting for a batch slot, ms (see the module docs).
pub fn slot_wait_ms(w: &WorkerView, service_ms: f64) -> f64 {
    let (running, waiting) = (f64::from(w.running), f64::from(w.waiting));
    if w.max_running > 0 {
        let slots = f64::from(w.max_running);
        (running + waiting + 1.0 - slots).max(0.0) * service_ms / slots
    } else if waiting > 0.0 {
        (waiting + 1.0) * service_ms / running.max(1.0)
    } else {
        0.0
    }
}

/// The KV barrier, ms: 0 below `knee`, `service * x² / (1 - x)` above (see the module docs).
pub fn kv_barrier_ms(kv_usage: f64, knee: f64, service_ms: f64) -> f64 {
    // Written to be false for NaN usage too.
    if kv_usage.is_nan() || kv_usage <= knee || knee >= 1.0 {
        return 0.0;
    }
    // Capped short of 1 so a worker reporting a full cache is very expensive, not infinite.
    let x = ((kv_usage - knee) / (1.0 - knee)).min(0.99);
    service_ms * x * x / (1.0 - x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(running: u32, waiting: u32, max_running: u32) -> WorkerView {
        WorkerView { id: 1, weight: 1, running, waiting, max_running, ..Default::default() }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn priors_until_points_then_the_fitted_line() {
        let p = Priors::default();
        let mut r = WorkerRates::default();
        assert_eq!(r.line(&p, 0.0), (50.0, 0.1));
        assert_eq!(r.line(&p, 80.0), (80.0, 0.1), "the gateway's TTFT EWMA stands in for the base");
        // A worker with 20 ms fixed and 0.4 ms per uncached token (2.5k tokens/s of prefill).
        for i in 0..40 {
            let u = f64::from(i % 8) * 500.0;
            r.observe_ttft(u, 20.0 + 0.4 * u, p.alpha);
        }
        let (base, slope) = r.line(&p, 80.0);
        assert!(close(base, 20.0) && close(slope, 0.4), "{base} {slope}");
        // Cached prompts cost only the base: 3 000 uncached tokens predict 1.22 s, none 20 ms.
        let w = view(0, 0, 8);
        assert!(close(predict_ttft_ms(&w, &r, &p, 3_000.0), 1_220.0));
        assert!(close(predict_ttft_ms(&w, &r, &p, 0.0), 20.0));
    }

    #[test]
    fn the_fit_follows_a_worker_that_slows_down() {
        let p = Priors::default();
        let mut r = WorkerRates::default();
        let feed = |per_token: f64, n: u32, r: &mut WorkerRates| {
            for i in 0..n {
                let u = f64::from(i % 5) * 400.0;
                r.observe_ttft(u, 30.0 + per_token * u, p.alpha);
            }
        };
        feed(0.1, 200, &mut r);
        assert!(close(r.line(&p, 0.0).1, 0.1));
        // Prefill gets 5x slower (a bigger model, a throttled GPU): within ~3/alpha points the fit is
        // within 10% of the new rate.
        feed(0.5, 60, &mut r);
        let slope = r.line(&p, 0.0).1;
        assert!((0.45..=0.5).contains(&slope), "{slope}");
    }

    #[test]
    fn without_spread_only_the_base_is_fitted() {
        let p = Priors::default();
        let mut r = WorkerRates::default();
        // Every prompt fully cached: u = 0 always, TTFT 35 ms. The slope cannot be told; keep the prior.
        for _ in 0..10 {
            r.observe_ttft(0.0, 35.0, p.alpha);
        }
        let (base, slope) = r.line(&p, 0.0);
        assert!(close(base, 35.0) && slope == p.prefill_ms_per_token);
        // Garbage points are ignored.
        r.observe_ttft(f64::NAN, 1.0, p.alpha);
        r.observe_ttft(1.0, -5.0, p.alpha);
        assert_eq!(r.line(&p, 0.0), (base, slope));
    }

    #[test]
    fn slot_wait_counts_requests_ahead_at_the_slot_rate() {
        // 8 slots, service 2 s: a slot frees every 250 ms.
        assert_eq!(slot_wait_ms(&view(7, 0, 8), 2_000.0), 0.0, "a free slot: no wait");
        assert_eq!(slot_wait_ms(&view(8, 0, 8), 2_000.0), 250.0);
        assert_eq!(slot_wait_ms(&view(8, 4, 8), 2_000.0), 1_250.0);
        // Slots unknown: the worker's own queue, slots freeing at running / service.
        assert_eq!(slot_wait_ms(&view(10, 0, 0), 2_000.0), 0.0);
        assert_eq!(slot_wait_ms(&view(10, 4, 0), 2_000.0), 1_000.0);
        // The service time is learned from latencies.
        let mut r = WorkerRates::default();
        let p = Priors::default();
        assert_eq!(r.service_ms(&p), 2_000.0);
        r.observe_service(1_000.0, 0.5);
        r.observe_service(3_000.0, 0.5);
        assert_eq!(r.service_ms(&p), 2_000.0);
        r.observe_service(1_000.0, 0.5);
        assert_eq!(r.service_ms(&p), 1_500.0);
    }

    #[test]
    fn the_kv_barrier_rises_steeply_towards_full() {
        let b = |u| kv_barrier_ms(u, 0.9, 1_000.0);
        assert_eq!((b(0.0), b(0.5), b(0.9)), (0.0, 0.0, 0.0));
        assert!(close(b(0.95), 500.0));
        assert!(close(b(0.98), 3_200.0));
        assert!(b(0.99) > 8_000.0 && b(1.0) > 90_000.0 && b(1.0).is_finite());
        // Monotone: more usage is never cheaper.
        let mut last = 0.0;
        for i in 0..=1000 {
            let v = b(f64::from(i) / 1000.0);
            assert!(v >= last);
            last = v;
        }
        assert_eq!(kv_barrier_ms(0.99, 1.0, 1_000.0), 0.0, "knee 1 disables the barrier");
    }

    #[test]
    fn errors_stretch_the_expected_time() {
        let p = Priors::default();
        let r = WorkerRates::default();
        let mut w = view(0, 0, 8);
        let clean = expected_ttft_ms(&w, &r, &p, 1_000.0);
        w.error_rate = 0.5;
        assert!(close(expected_ttft_ms(&w, &r, &p, 1_000.0), 2.0 * clean));
        w.error_rate = 1.0;
        assert!(close(expected_ttft_ms(&w, &r, &p, 1_000.0), 10.0 * clean));
    }
}
