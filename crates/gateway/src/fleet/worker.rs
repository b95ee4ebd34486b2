//! A worker of the fleet: its fixed identity, what it serves, and its live state in atomics.
//!
//! Live state is written by probes and by request guards and read lock-free when a request is routed.
//! It lives in [`Worker`] (shared by `Arc`) so a config reload that keeps a worker keeps its counters.

use crate::config::WorkerConfig;
use crate::fleet::slot::word::Slots;
use arc_swap::ArcSwap;
use gateway_core::{Outcome, WorkerId, WorkerView};
use guard::Transition;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// An `f64` stored in an `AtomicU64`.
#[derive(Debug, Default)]
pub struct AtomicF64(AtomicU64);

impl AtomicF64 {
    /// Reads the value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Writes the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// Moves the value towards `sample` by `alpha` (an EWMA step); the first sample is taken as is.
    /// Races between two updaters lose one sample at worst, which an average tolerates.
    pub fn ewma(&self, sample: f64, alpha: f64) {
        let old = self.get();
        self.set(if old == 0.0 { sample } else { old + alpha * (sample - old) });
    }
}

/// Live counters of one worker.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests in flight on it and slots reserved for dequeued requests, in one word moved only by
    /// the guards of [`crate::fleet::slot`] (on every path, never reset).
    pub slots: Slots,
    /// Passed its health probes.
    pub healthy: AtomicBool,
    /// An operator drained it: no new requests.
    pub draining: AtomicBool,
    /// `vllm:num_requests_running` at the last scrape.
    pub scraped_running: AtomicU32,
    /// `vllm:num_requests_waiting` at the last scrape.
    pub scraped_waiting: AtomicU32,
    /// Load the worker reported at the last scrape that this gateway did not send (other replicas,
    /// direct clients): `guard::foreign_load`. Discounted from its capacity without a shared count.
    pub foreign_load: AtomicU32,
    /// What this replica knows of the worker's slot count shared with other replicas (`[cluster]`).
    pub share: crate::fleet::share::WorkerShare,
    /// Requests dispatched since the last scrape (corrects the scraped counts between scrapes).
    pub sent_since_scrape: AtomicU32,
    /// KV-cache usage at the last scrape, 0..1.
    pub kv_usage: AtomicF64,
    /// EWMA of time to first token, ms.
    pub ttft_ms: AtomicF64,
    /// EWMA of time per output token, ms.
    pub tpot_ms: AtomicF64,
    /// Share of failures among the outcomes of the last 30 s (mirrors `errors` for lock-free reads).
    pub error_rate: AtomicF64,
    /// The sliding window behind `error_rate`.
    pub errors: parking_lot::Mutex<guard::SlidingErrorRate>,
    /// Requests dispatched to it, ever.
    pub requests_total: AtomicU64,
    /// Requests it was seen running while others waited in its own queue: its `max_num_seqs`.
    pub learned_capacity: AtomicU32,
    /// The most requests seen on it at once: running at a scrape, or in flight from this gateway
    /// between two scrapes (the ramp's evidence, [`crate::fleet::capacity::ramp`]).
    pub seen_running: AtomicU32,
    /// The largest capacity known for another worker serving one of its models (0: none);
    /// [`crate::fleet::Fleet::share_capacities`] keeps it.
    pub peer_capacity: AtomicU32,
    /// Requests its engine says it runs at once (0: it did not say); see [`crate::fleet::capacity`].
    pub engine_capacity: AtomicU32,
    /// Consecutive failed probes.
    pub probe_failures: AtomicU32,
    /// Consecutive good probes.
    pub probe_successes: AtomicU32,
    /// When it last showed it is alive under load, in ms since [`Worker::epoch`]: response headers, body
    /// bytes, a finished request, or tokens generated between two scrapes (see [`guard::stall`]).
    pub last_alive_ms: AtomicU64,
    /// EWMA of how long a non-streamed request waits for its response headers, ms: its usual latency.
    pub answer_ms: AtomicF64,
    /// Tokens generated as of the last scrape, to see generation progress between scrapes.
    pub scraped_generated: AtomicU64,
    /// KV-cache capacity in tokens the engine reported (0: it did not; the policy then learns it).
    pub cache_tokens: AtomicU64,
    /// The metrics dialect of its engine ([`crate::fleet::scrape::Dialect`] as `u8`).
    pub dialect: std::sync::atomic::AtomicU8,
    /// When a real request on it last succeeded, in ms since [`Worker::epoch`].
    pub last_success_ms: AtomicU64,
    /// Requests dispatched to it per second, averaged over the last scrapes (0 until measured). Under
    /// saturation a dispatch follows each slot that frees: the admission hand-off reads its inverse as
    /// the worker's own slot interval, so a slow worker's line is not priced at the fleet's pace.
    pub dispatch_rate: AtomicF64,
    /// `requests_total` and its time at the last [`Worker::update_dispatch_rate`].
    dispatch_mark: parking_lot::Mutex<Option<(Instant, u64)>>,
}

/// What a worker's health probe asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbePath {
    /// `auto`, not resolved yet: `/health` is tried first, then `/v1/models`.
    Auto,
    /// This path; `auto` marks one it found so it is re-resolved if the path goes away.
    Path { path: String, auto: bool },
    /// No probe: healthy until real requests fail (`none`, or `auto` when neither path exists).
    Passive { auto: bool },
}

impl ProbePath {
    /// From `health.path` or a worker's `health_path`.
    pub fn from_config(path: &str) -> Self {
        match path {
            "auto" => Self::Auto,
            "none" => Self::Passive { auto: false },
            p => Self::Path { path: p.to_string(), auto: false },
        }
    }

    /// As shown in `/api/workers`: the path, `passive`, or `auto` while unresolved.
    pub fn describe(&self) -> &str {
        match self {
            Self::Auto => "auto",
            Self::Path { path, .. } => path,
            Self::Passive { .. } => "passive",
        }
    }
}

/// One worker: identity, models, live stats.
#[derive(Debug)]
pub struct Worker {
    /// Stable id.
    pub id: WorkerId,
    /// Display name (config `name`, else `host:port`).
    pub name: String,
    /// The config entry it was built from.
    pub spec: WorkerConfig,
    /// Base URL without a trailing slash or credentials (what requests go to; never shown).
    pub base_url: String,
    /// Its idle keep-alive connections, and where they go (`base_url`'s host and path).
    pub connections: Arc<crate::upstream::connections::WorkerConnections>,
    /// `Authorization` header value sent upstream, when the worker has an API key.
    pub auth_header: Option<http::HeaderValue>,
    /// Its name as the `X-Gateway-Worker` header of answers (`None` when the name is no header value),
    /// made once: a clone shares its bytes.
    pub name_header: Option<http::HeaderValue>,
    /// Models it serves: configured, or learned from `/v1/models`.
    pub models: ArcSwap<Vec<String>>,
    /// Live counters.
    pub stats: WorkerStats,
    /// The worker's circuit breaker (short, never-awaited critical sections; "closed" read lock-free).
    pub breaker: crate::fleet::breaker::BreakerCell,
    /// Origin of the millisecond clock of [`WorkerStats::last_alive_ms`].
    pub epoch: Instant,
    /// What its health probe asks (resolved by the probe when `auto`).
    pub probe_path: ArcSwap<ProbePath>,
}

/// Weight of a new sample in the latency and error EWMAs.
const EWMA_ALPHA: f64 = 0.2;
/// The longest slot interval [`Worker::slot_interval`] reports (a worker nearly idle between scrapes).
const MAX_SLOT_INTERVAL_SECS: f64 = 10.0;

impl Worker {
    /// A worker from its config entry. It starts unhealthy until its first probe passes.
    pub fn new(id: WorkerId, spec: WorkerConfig) -> Self {
        let auth_header =
            spec.api_key.as_ref().and_then(|k| http::HeaderValue::from_str(&format!("Bearer {k}")).ok()).map(
                |mut v| {
                    v.set_sensitive(true);
                    v
                },
            );
        let base_url = crate::config::strip_userinfo(&spec.url).trim_end_matches('/').to_string();
        let connections = Arc::new(crate::upstream::connections::WorkerConnections::new(&base_url));
        let name = spec.display_name();
        let name_header = http::HeaderValue::from_str(&name).ok();
        Self {
            id,
            name,
            name_header,
            base_url,
            connections,
            auth_header,
            models: ArcSwap::from_pointee(spec.models.clone()),
            spec,
            stats: WorkerStats::default(),
            breaker: crate::fleet::breaker::BreakerCell::default(),
            epoch: Instant::now(),
            probe_path: ArcSwap::from_pointee(ProbePath::Auto),
        }
    }

    /// Notes a real request that succeeded at `now` (passive health evidence), which is also life.
    pub fn mark_success(&self, now: Instant) {
        self.mark_alive(now);
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.stats.last_success_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When a real request on it last succeeded, if ever.
    pub fn last_success(&self) -> Option<Instant> {
        let ms = self.stats.last_success_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| self.epoch + std::time::Duration::from_millis(ms))
    }

    /// Its engine's metrics dialect, as last scraped.
    pub fn dialect(&self) -> crate::fleet::scrape::Dialect {
        crate::fleet::scrape::Dialect::from_u8(self.stats.dialect.load(Ordering::Relaxed))
    }

    /// Notes a sign of life at `now` (an answer, body bytes, generated tokens).
    pub fn mark_alive(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        // Called per relayed chunk from every core: most chunks land in a millisecond already noted,
        // and a read leaves the line shared where a read-modify-write would take it from the other core.
        if ms > self.stats.last_alive_ms.load(Ordering::Relaxed) {
            self.stats.last_alive_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// When it last showed a sign of life (its creation if never).
    pub fn last_alive(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.stats.last_alive_ms.load(Ordering::Relaxed))
    }

    /// How long a non-streamed request usually waits for its answer here, once seen.
    pub fn usual_answer_time(&self) -> Option<std::time::Duration> {
        let ms = self.stats.answer_ms.get();
        (ms > 0.0).then(|| std::time::Duration::from_secs_f64(ms / 1000.0))
    }

    /// Records how long a non-streamed request waited for its (successful) answer.
    pub fn record_answer_time(&self, waited: std::time::Duration) {
        self.stats.answer_ms.ewma(waited.as_secs_f64() * 1000.0, EWMA_ALPHA);
    }

    /// Opens its breaker now (a stalled worker); returns the transition for the caller to count.
    pub fn trip_breaker(&self, now: Instant) -> Option<Transition> {
        let t = self.breaker.lock().trip(now.into_std());
        self.log_transition(t)
    }

    /// Opens its breaker for `open_for` because another replica's breaker for it opened
    /// ([`crate::cluster`]); its own failure streak is left alone. Logged here at info (the opener warned);
    /// returns the transition for the caller to count.
    pub fn open_breaker_as_told(&self, now: Instant, open_for: std::time::Duration) -> Option<Transition> {
        let t = self.breaker.lock().trip_for(now.into_std(), open_for);
        if t.is_some() {
            let open_ms = open_for.as_millis() as u64;
            tracing::info!(worker = %self.name, open_ms, "circuit breaker opened: another replica's breaker opened");
        }
        t
    }

    /// Whether its breaker would let a request through now.
    pub fn breaker_admits(&self, now: Instant) -> bool {
        self.breaker.would_admit(now)
    }

    /// Its breaker's state, counts and last transition as of `now`.
    pub fn breaker_snapshot(&self, now: Instant) -> guard::BreakerSnapshot {
        self.breaker.lock().snapshot(now.into_std())
    }

    /// Its breaker's state name as of `now`.
    pub fn breaker_state(&self, now: Instant) -> guard::StateName {
        self.breaker.lock().state(now.into_std()).name()
    }

    /// Closes its breaker (an operator's reset), logging the transition; returns it for the caller to count.
    pub fn reset_breaker(&self, now: Instant) -> Option<Transition> {
        let t = self.breaker.lock().reset(now.into_std());
        self.log_transition(t)
    }

    /// Logs a breaker transition and, when the breaker closed, starts its error window afresh (old
    /// failures must not trip it again at once); returns the transition for the caller to count.
    pub fn log_transition(&self, t: Option<Transition>) -> Option<Transition> {
        if let Some(t) = t {
            if t.to == guard::StateName::Closed {
                *self.stats.errors.lock() = guard::SlidingErrorRate::default();
                self.stats.error_rate.set(0.0);
            }
            let (from, to) = (t.from.as_str(), t.to.as_str());
            if t.to == guard::StateName::Open {
                tracing::warn!(worker = %self.name, from, to, "circuit breaker opened");
            } else {
                tracing::info!(worker = %self.name, from, to, "circuit breaker transition");
            }
        }
        t
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.load().iter().any(|m| m == model)
    }

    /// Requests the gateway keeps in flight on it at most (`u32::MAX`: unlimited). `default` is
    /// `queue.default_worker_concurrency`; the tiers are in [`crate::fleet::capacity`].
    pub fn capacity(&self, default: u32) -> u32 {
        self.capacity_tier(default).0
    }

    /// Its capacity and the tier that set it: `max_concurrency`, else what its engine reports, else what
    /// was learned from its metrics, else `default` when set, else the ramp when its metrics report its
    /// load and a peer's capacity is known, else unlimited.
    pub fn capacity_tier(&self, default: u32) -> (u32, crate::fleet::capacity::CapacitySource) {
        let s = &self.stats;
        let scraped = self.dialect() != crate::fleet::scrape::Dialect::None;
        let (peers, seen) = (s.peer_capacity.load(Ordering::Relaxed), s.seen_running.load(Ordering::Relaxed));
        let ramp = if scraped { crate::fleet::capacity::ramp(peers, seen) } else { 0 };
        crate::fleet::capacity::tier(
            self.spec.max_concurrency,
            s.engine_capacity.load(Ordering::Relaxed),
            s.learned_capacity.load(Ordering::Relaxed),
            default,
            ramp,
        )
    }

    /// Its capacity when configured, stated by its engine or learned; 0 when none of those knows (the
    /// default and the ramp are bounds the gateway chose, not the worker's batch size).
    pub fn known_capacity(&self) -> u32 {
        use crate::fleet::capacity::CapacitySource::{Configured, Engine, Learned};
        match self.capacity_tier(0) {
            (c, Configured | Engine | Learned) => c,
            _ => 0,
        }
    }

    /// Healthy and not draining.
    pub fn is_available(&self) -> bool {
        self.stats.healthy.load(Ordering::Relaxed) && !self.stats.draining.load(Ordering::Relaxed)
    }

    /// The load snapshot a routing policy sees.
    pub fn view(&self) -> WorkerView {
        let s = &self.stats;
        let sent = s.sent_since_scrape.load(Ordering::Relaxed);
        let in_flight = s.slots.in_flight();
        // Without engine metrics the gateway's own count is the load.
        let scraped = self.dialect() != crate::fleet::scrape::Dialect::None;
        WorkerView {
            id: self.id,
            weight: self.spec.weight,
            in_flight,
            running: if scraped { s.scraped_running.load(Ordering::Relaxed).saturating_add(sent) } else { in_flight },
            waiting: if scraped { s.scraped_waiting.load(Ordering::Relaxed) } else { 0 },
            kv_usage: s.kv_usage.get(),
            ttft_ms: s.ttft_ms.get(),
            tpot_ms: s.tpot_ms.get(),
            error_rate: s.error_rate.get(),
            max_running: self.known_capacity(),
            cache_tokens: s.cache_tokens.load(Ordering::Relaxed),
        }
    }

    /// Lets old outcomes age out of the error rate (called by the probe, so an idle worker recovers).
    pub fn refresh_error_rate(&self, now: Instant) {
        let rate = self.stats.errors.lock().rate(now.into_std());
        self.stats.error_rate.set(rate);
    }

    /// Counts a request sent to it (the scrape correction and the total).
    pub(crate) fn count_dispatch(&self) {
        self.stats.sent_since_scrape.fetch_add(1, Ordering::Relaxed);
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Updates [`WorkerStats::dispatch_rate`] from the dispatches counted since the last update (the
    /// scrape calls it once per probe interval): half the last measure, half the one before, so a change
    /// of pace shows within a few seconds.
    pub fn update_dispatch_rate(&self, now: Instant) {
        let s = &self.stats;
        let total = s.requests_total.load(Ordering::Relaxed);
        let mut mark = s.dispatch_mark.lock();
        if let Some((at, before)) = *mark {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs < 0.1 {
                return;
            }
            let measured = total.saturating_sub(before) as f64 / secs;
            let old = s.dispatch_rate.get();
            s.dispatch_rate.set(if old > 0.0 { (old + measured) / 2.0 } else { measured });
        }
        *mark = Some((now, total));
    }

    /// The expected time between two of its slots freeing under saturation (the inverse of its
    /// dispatch rate), `None` until a rate was measured.
    pub fn slot_interval(&self) -> Option<std::time::Duration> {
        let rate = self.stats.dispatch_rate.get();
        (rate > 0.0).then(|| std::time::Duration::from_secs_f64((1.0 / rate).min(MAX_SLOT_INTERVAL_SECS)))
    }

    /// Feeds a finished request into the latency and error estimates.
    pub fn record(&self, outcome: &Outcome, now: Instant) {
        let s = &self.stats;
        let now = now.into_std();
        let failed = outcome.kind.is_failure();
        // Only verdicts on the worker count: client errors, overload and cancels say nothing of its health.
        if failed || outcome.kind == gateway_core::OutcomeKind::Success {
            let mut errors = s.errors.lock();
            errors.record(now, failed);
            s.error_rate.set(errors.rate(now));
        }
        if outcome.kind == gateway_core::OutcomeKind::Success {
            if let Some(ttft) = outcome.ttft {
                s.ttft_ms.ewma(ttft.as_secs_f64() * 1000.0, EWMA_ALPHA);
            }
            if let Some(tpot) = outcome.tpot_ms() {
                s.tpot_ms.ewma(tpot, EWMA_ALPHA);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::slot::{Refused, Reservation};
    use gateway_core::OutcomeKind;
    use std::sync::Arc;

    #[test]
    fn guard_counts_and_releases() {
        let w = Arc::new(Worker::new(1, WorkerConfig::from_url("http://127.0.0.1:1")));
        let now = Instant::now();
        let g1 = w.acquire(true, u32::MAX, now, None).unwrap();
        let g2 = w.acquire(false, u32::MAX, now, None).unwrap();
        assert_eq!(w.view().in_flight, 2);
        assert_eq!(w.view().running, 2, "sent since scrape corrects running");
        drop(g1);
        assert_eq!(w.view().in_flight, 1);
        drop(g2);
        assert_eq!(w.view().in_flight, 0);
        assert_eq!(w.name, "127.0.0.1:1");
    }

    #[test]
    fn guards_settle_the_breaker_with_their_verdicts() {
        let w = Arc::new(Worker::new(1, WorkerConfig::from_url("http://h:1")));
        let now = Instant::now();
        let cfg = crate::config::CircuitBreakerConfig::default();
        for _ in 0..4 {
            let mut g = w.acquire(true, u32::MAX, now, None).unwrap();
            g.settle(OutcomeKind::Timeout, now, &cfg);
        }
        // Cancels and overload say nothing about the worker: the streak goes on.
        drop(w.acquire(true, u32::MAX, now, None).unwrap());
        w.acquire(true, u32::MAX, now, None).unwrap().settle(OutcomeKind::Overloaded, now, &cfg);
        assert!(w.breaker_admits(now));
        let t = w.acquire(true, u32::MAX, now, None).unwrap().settle(OutcomeKind::ConnectError, now, &cfg);
        assert_eq!(t.map(|t| t.to), Some(guard::StateName::Open), "the fifth consecutive failure opens it");
        assert!(!w.breaker_admits(now));
        assert!(matches!(w.acquire(true, u32::MAX, now, None), Err(Refused::Breaker(_))));
        assert_eq!(w.view().in_flight, 0, "a refused acquire takes no slot");
        assert!(w.acquire(false, u32::MAX, now, None).is_ok(), "with breakers off nothing is refused");
    }

    #[test]
    fn acquire_respects_capacity_and_reservations() {
        let w = Arc::new(Worker::new(1, WorkerConfig::from_url("http://h:1")));
        let now = Instant::now();
        let a = w.acquire(false, 2, now, None).unwrap();
        let r = Reservation::try_take(&w, 2, None).unwrap();
        assert!(
            matches!(w.acquire(false, 2, now, None), Err(Refused::Full)),
            "one in flight plus one reserved is full"
        );
        assert!(Reservation::try_take(&w, 2, None).is_none());
        drop(r);
        let _b = w.acquire(false, 2, now, None).unwrap();
        assert!(matches!(w.acquire(false, 2, now, None), Err(Refused::Full)));
        drop(a);
        assert!(w.acquire(false, 2, now, None).is_ok());
        assert_eq!(w.capacity(0), u32::MAX);
        assert_eq!(w.capacity(7), 7);
        w.stats.learned_capacity.store(4, Ordering::Relaxed);
        assert_eq!(w.capacity(7), 4, "learned beats the default");
        w.stats.engine_capacity.store(1, Ordering::Relaxed);
        assert_eq!(
            w.capacity_tier(7),
            (1, crate::fleet::capacity::CapacitySource::Engine),
            "the engine's word beats learning"
        );
    }

    #[test]
    fn a_high_failure_rate_trips_the_breaker_without_a_streak() {
        let w = Arc::new(Worker::new(1, WorkerConfig::from_url("http://h:1")));
        let now = Instant::now();
        let cfg = crate::config::CircuitBreakerConfig { min_requests: 10, ..Default::default() };
        let out = |kind| Outcome::new(1, kind, None, Default::default());
        // Alternating success and failure: never two failures in a row, half of them failed.
        let mut opened = None;
        for i in 0..20 {
            let kind = if i % 2 == 0 { OutcomeKind::Success } else { OutcomeKind::ServerError };
            w.record(&out(kind), now);
            let t = w.acquire(true, u32::MAX, now, None).unwrap().settle(kind, now, &cfg);
            if t.is_some() {
                opened = Some(i);
                break;
            }
        }
        assert_eq!(opened, Some(9), "trips at the first failure once 10 outcomes are in the window");
        let closed = w.reset_breaker(now);
        assert!(closed.is_some());
        assert_eq!(w.stats.error_rate.get(), 0.0, "closing starts the window afresh");
    }

    #[test]
    fn error_rate_rises_and_decays() {
        let w = Worker::new(1, WorkerConfig::from_url("http://h:1"));
        let out = |kind| Outcome::new(1, kind, None, Default::default());
        let t0 = Instant::now();
        for _ in 0..5 {
            w.record(&out(gateway_core::OutcomeKind::ServerError), t0);
        }
        for _ in 0..5 {
            w.record(&out(gateway_core::OutcomeKind::Success), t0);
            w.record(&out(gateway_core::OutcomeKind::ClientError), t0);
        }
        assert_eq!(w.stats.error_rate.get(), 0.5, "client errors are not verdicts on the worker");
        w.refresh_error_rate(t0 + std::time::Duration::from_secs(31));
        assert_eq!(w.stats.error_rate.get(), 0.0, "old outcomes age out");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_admits_trials_after_its_timeout_and_closes_on_their_success() {
        let w = Arc::new(Worker::new(1, WorkerConfig::from_url("http://h:1")));
        let cfg = crate::config::CircuitBreakerConfig { timeout_seconds: 30, ..Default::default() };
        w.breaker.lock().reconfigure(cfg.breaker());
        let opened = w.trip_breaker(Instant::now());
        assert_eq!(opened.map(|t| t.to), Some(guard::StateName::Open));
        tokio::time::advance(std::time::Duration::from_millis(29_999)).await;
        assert!(!w.breaker_admits(Instant::now()), "still open just before the timeout");
        assert!(matches!(w.acquire(true, 1, Instant::now(), None), Err(Refused::Breaker(_))));
        assert_eq!(w.stats.slots.taken(), 0, "the refusal gave its slot back");
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert_eq!(w.breaker_state(Instant::now()), guard::StateName::HalfOpen);
        for i in 0..cfg.success_threshold {
            let mut g = w.acquire(true, 1, Instant::now(), None).expect("a trial is admitted");
            let t = g.take_transition().map(|t| t.to);
            assert_eq!(t, (i == 0).then_some(guard::StateName::HalfOpen), "the first trial moves it to half-open");
            g.settle(OutcomeKind::Success, Instant::now(), &cfg);
        }
        assert_eq!(w.breaker_state(Instant::now()), guard::StateName::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_dispatch_rate_is_measured_between_scrapes_and_gives_the_slot_interval() {
        let w = Worker::new(1, WorkerConfig::from_url("http://h:1"));
        assert_eq!(w.slot_interval(), None, "nothing measured yet");
        w.update_dispatch_rate(Instant::now());
        for _ in 0..20 {
            w.count_dispatch();
        }
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        w.update_dispatch_rate(Instant::now());
        assert_eq!(w.stats.dispatch_rate.get(), 20.0);
        assert_eq!(w.slot_interval(), Some(std::time::Duration::from_millis(50)));
        // Half the last measure, half the one before: a pace that drops shows at once, damped.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        w.update_dispatch_rate(Instant::now());
        assert_eq!(w.stats.dispatch_rate.get(), 10.0);
        // Updates closer than 100 ms apart are ignored (no rate from a sliver of time).
        w.count_dispatch();
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        w.update_dispatch_rate(Instant::now());
        assert_eq!(w.stats.dispatch_rate.get(), 10.0);
        // A worker nearly idle reports a bounded interval.
        w.stats.dispatch_rate.set(0.001);
        assert_eq!(w.slot_interval(), Some(std::time::Duration::from_secs(10)));
    }
}
