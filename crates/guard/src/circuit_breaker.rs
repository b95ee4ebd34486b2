//! A per-worker circuit breaker (Hystrix-style): stop sending requests to a worker that keeps failing,
//! then probe it with a few trial requests before trusting it again.
//!
//! # Why
//! A crashed or wedged vLLM worker fails fast (connection refused) or slowly (timeouts). Without a
//! breaker, every routing pick that lands on it costs a client a retry or a timeout. The breaker takes
//! the worker out of the eligible set for `timeout`, then lets a bounded number of trials through.
//!
//! # Algorithm
//! ```text
//!            failure_threshold consecutive failures
//!   Closed ------------------------------------------> Open{since}
//!     ^                                                 |  timeout passed (next try_acquire / tick)
//!     | success_threshold trial successes               v
//!     +------------------------------------------- HalfOpen{in_flight, successes}
//!                      one trial failure: back to Open{since: now}
//! ```
//! - Closed: every request is admitted; a success resets the failure streak.
//! - Open: every request is rejected with the time left until the half-open probe.
//! - HalfOpen: at most `half_open_requests` trials run at once; the rest are rejected.
//!   [`CircuitBreaker::on_cancel`] frees a trial's slot without a verdict.
//! - [`CircuitBreaker::reset`] forces Closed (an operator's action).
//!
//! Results are reported with the [`Permit`] that [`CircuitBreaker::try_acquire`] handed out. The permit
//! remembers the breaker's *epoch*, bumped on every transition, so a late result from an earlier state
//! (a request admitted while Closed that fails after the breaker opened, or a trial of an abandoned
//! half-open round) is counted in the totals but cannot move the state machine or free a slot it
//! never held. A half-open round whose slots are all still taken after `timeout` is abandoned and a new
//! round starts, so a permit that was never reported (a bug) cannot wedge a worker out forever.
//!
//! Transitions are returned to the caller as [`Transition`] (to log and count them) and the last one is
//! kept for the admin API. [`CircuitBreaker::state`] is a read-only view: it reports an Open breaker
//! whose timeout has passed as HalfOpen, and the transition itself is made (and returned) by the next
//! `try_acquire` or [`CircuitBreaker::tick`].

use gateway_core::OutcomeKind;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Thresholds of a breaker. Zero thresholds and zero trial slots are taken as 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures in Closed that open the breaker.
    pub failure_threshold: u32,
    /// Trial successes in HalfOpen that close it.
    pub success_threshold: u32,
    /// How long it stays Open before trials are let through.
    pub timeout: Duration,
    /// Trials allowed at once in HalfOpen.
    pub half_open_requests: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, success_threshold: 3, timeout: Duration::from_secs(30), half_open_requests: 3 }
    }
}

impl BreakerConfig {
    fn sanitized(mut self) -> Self {
        self.failure_threshold = self.failure_threshold.max(1);
        self.success_threshold = self.success_threshold.max(1);
        self.half_open_requests = self.half_open_requests.max(1);
        self
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Healthy: everything is admitted.
    Closed,
    /// Failing: everything is rejected until `since + timeout`.
    Open {
        /// When it opened.
        since: Instant,
    },
    /// Probing: a few trials are admitted.
    HalfOpen {
        /// Trials running now.
        in_flight: u32,
        /// Trials that succeeded in this round.
        successes: u32,
    },
}

impl BreakerState {
    /// The state's name without its data.
    pub fn name(&self) -> StateName {
        match self {
            Self::Closed => StateName::Closed,
            Self::Open { .. } => StateName::Open,
            Self::HalfOpen { .. } => StateName::HalfOpen,
        }
    }
}

/// A state's name, for logs, metrics labels and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    /// See [`BreakerState::Closed`].
    Closed,
    /// See [`BreakerState::Open`].
    Open,
    /// See [`BreakerState::HalfOpen`].
    HalfOpen,
}

impl StateName {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A change of state, for the gateway to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: StateName,
    /// The state entered.
    pub to: StateName,
    /// When (the `now` of the call that made it).
    pub at: Instant,
}

/// Leave to send one request; report its result with it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "report the request's result with on_success, on_failure, on_cancel or on_outcome"]
pub struct Permit {
    trial: bool,
    epoch: u64,
    /// The transition this acquisition made (Open to HalfOpen), if any.
    pub transition: Option<Transition>,
}

impl Permit {
    /// Whether this is a half-open trial, whose result decides the breaker's state.
    pub fn is_trial(&self) -> bool {
        self.trial
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// The state that refused it (Open, or HalfOpen with every trial slot taken).
    pub state: StateName,
    /// Time until trials are let through when Open; zero when HalfOpen (a slot frees when a running
    /// trial ends, which cannot be predicted).
    pub retry_after: Duration,
}

/// Running totals since the breaker was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BreakerCounters {
    /// Successes reported (including late ones from an earlier state).
    pub successes: u64,
    /// Failures reported (including late ones).
    pub failures: u64,
    /// Requests refused by `try_acquire`.
    pub rejections: u64,
    /// Trials cancelled without a verdict.
    pub cancels: u64,
    /// Times it entered Open.
    pub opens: u64,
}

/// The last transition as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TransitionSnapshot {
    /// The state left.
    pub from: StateName,
    /// The state entered.
    pub to: StateName,
    /// Milliseconds since it happened.
    pub ago_ms: u64,
}

/// A breaker's state and counters for the admin API (`serde`-serialisable, no `Instant`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BreakerSnapshot {
    /// The effective state now.
    pub state: StateName,
    /// Current streak of consecutive failures (Closed).
    pub consecutive_failures: u32,
    /// Trials running (HalfOpen).
    pub half_open_in_flight: u32,
    /// Trial successes in this round (HalfOpen).
    pub half_open_successes: u32,
    /// Milliseconds until trials are let through (Open).
    pub retry_after_ms: Option<u64>,
    /// Running totals.
    pub counters: BreakerCounters,
    /// The last transition, if any.
    pub last_transition: Option<TransitionSnapshot>,
}

/// One worker's breaker; see the module docs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    epoch: u64,
    /// When the current HalfOpen round started.
    round_started: Option<Instant>,
    counters: BreakerCounters,
    last_transition: Option<Transition>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new(BreakerConfig::default())
    }
}

impl CircuitBreaker {
    /// A Closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg: cfg.sanitized(),
            state: BreakerState::Closed,
            consecutive_failures: 0,
            epoch: 0,
            round_started: None,
            counters: BreakerCounters::default(),
            last_transition: None,
        }
    }

    /// The thresholds in force.
    pub fn config(&self) -> BreakerConfig {
        self.cfg
    }

    /// Changes the thresholds (a config reload), keeping the state.
    pub fn reconfigure(&mut self, cfg: BreakerConfig) {
        self.cfg = cfg.sanitized();
    }

    /// Running totals.
    pub fn counters(&self) -> BreakerCounters {
        self.counters
    }

    /// The last transition made, if any.
    pub fn last_transition(&self) -> Option<Transition> {
        self.last_transition
    }

    /// The state as of `now`, without changing anything: an Open breaker whose timeout has passed is
    /// reported as `HalfOpen { in_flight: 0, successes: 0 }`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open { since } if self.open_elapsed(since, now) => {
                BreakerState::HalfOpen { in_flight: 0, successes: 0 }
            }
            s => s,
        }
    }

    /// Whether it is closed (admitting everything, whatever the time).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, BreakerState::Closed)
    }

    /// Whether a request would be admitted now (for eligibility filtering; does not take a slot).
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { in_flight, .. } => {
                in_flight < self.cfg.half_open_requests || self.round_expired(now)
            }
        }
    }

    fn open_elapsed(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.cfg.timeout
    }

    fn round_expired(&self, now: Instant) -> bool {
        self.round_started.is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.timeout)
    }

    fn go(&mut self, to: BreakerState, now: Instant) -> Transition {
        let t = Transition { from: self.state.name(), to: to.name(), at: now };
        self.state = to;
        self.epoch += 1;
        self.consecutive_failures = 0;
        self.round_started = matches!(to, BreakerState::HalfOpen { .. }).then_some(now);
        if t.to == StateName::Open {
            self.counters.opens += 1;
        }
        self.last_transition = Some(t);
        t
    }

    /// Makes the time-driven transitions due at `now`: Open to HalfOpen once `timeout` has passed, and
    /// a new HalfOpen round when the current one has had every slot taken for `timeout`.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            BreakerState::Open { since } if self.open_elapsed(since, now) => {
                Some(self.go(BreakerState::HalfOpen { in_flight: 0, successes: 0 }, now))
            }
            BreakerState::HalfOpen { in_flight, .. }
                if in_flight >= self.cfg.half_open_requests && self.round_expired(now) =>
            {
                Some(self.go(BreakerState::HalfOpen { in_flight: 0, successes: 0 }, now))
            }
            _ => None,
        }
    }

    /// Asks to send one request now. Closed: admitted. Open: rejected until `timeout` has passed, then
    /// the breaker goes HalfOpen and this becomes a trial. HalfOpen: a trial if a slot is free.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, Rejected> {
        let transition = self.tick(now);
        match &mut self.state {
            BreakerState::Closed => Ok(Permit { trial: false, epoch: self.epoch, transition }),
            BreakerState::Open { since } => {
                let retry_after = (*since + self.cfg.timeout).saturating_duration_since(now);
                self.counters.rejections += 1;
                Err(Rejected { state: StateName::Open, retry_after })
            }
            BreakerState::HalfOpen { in_flight, .. } => {
                if *in_flight < self.cfg.half_open_requests {
                    *in_flight += 1;
                    Ok(Permit { trial: true, epoch: self.epoch, transition })
                } else {
                    self.counters.rejections += 1;
                    Err(Rejected { state: StateName::HalfOpen, retry_after: Duration::ZERO })
                }
            }
        }
    }

    /// Reports that the request behind `permit` succeeded.
    pub fn on_success(&mut self, permit: Permit, now: Instant) -> Option<Transition> {
        self.counters.successes += 1;
        if permit.epoch != self.epoch {
            return None;
        }
        match &mut self.state {
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                None
            }
            BreakerState::HalfOpen { in_flight, successes } if permit.trial => {
                *in_flight = in_flight.saturating_sub(1);
                *successes += 1;
                (*successes >= self.cfg.success_threshold).then(|| self.go(BreakerState::Closed, now))
            }
            _ => None,
        }
    }

    /// Reports that the request behind `permit` failed (the worker's fault: 5xx, connect error,
    /// timeout).
    pub fn on_failure(&mut self, permit: Permit, now: Instant) -> Option<Transition> {
        self.counters.failures += 1;
        if permit.epoch != self.epoch {
            return None;
        }
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures += 1;
                (self.consecutive_failures >= self.cfg.failure_threshold)
                    .then(|| self.go(BreakerState::Open { since: now }, now))
            }
            BreakerState::HalfOpen { .. } if permit.trial => Some(self.go(BreakerState::Open { since: now }, now)),
            _ => None,
        }
    }

    /// Reports that the request behind `permit` ended without saying anything about the worker (the
    /// client went away, the worker was merely full). A trial's slot is freed; nothing is counted
    /// towards a verdict, and a Closed breaker's failure streak is left as it is.
    pub fn on_cancel(&mut self, permit: Permit) {
        if !permit.trial {
            return;
        }
        self.counters.cancels += 1;
        if permit.epoch != self.epoch {
            return;
        }
        if let BreakerState::HalfOpen { in_flight, .. } = &mut self.state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Reports an [`OutcomeKind`]: `Success` and `ClientError` (the worker answered sanely) are
    /// successes; [`OutcomeKind::is_failure`] outcomes are failures; `Overloaded` and `Cancelled` are
    /// cancels.
    pub fn on_outcome(&mut self, permit: Permit, kind: OutcomeKind, now: Instant) -> Option<Transition> {
        match kind {
            OutcomeKind::Success | OutcomeKind::ClientError => self.on_success(permit, now),
            k if k.is_failure() => self.on_failure(permit, now),
            _ => {
                self.on_cancel(permit);
                None
            }
        }
    }

    /// Opens a Closed breaker now, for a reason judged outside the streak (the caller's failure rate
    /// over a window: a worker failing half its requests at random rarely fails five in a row).
    /// Returns the transition, or `None` when it was not Closed.
    pub fn trip(&mut self, now: Instant) -> Option<Transition> {
        self.trip_for(now, self.cfg.timeout)
    }

    /// Opens a Closed breaker now so that trials start after `open_for` (at most its own `timeout`):
    /// an opening another gateway made and told of, with the time it has left. Its own failure streak
    /// and counters of results are not touched. Returns the transition, or `None` when it was not Closed.
    pub fn trip_for(&mut self, now: Instant, open_for: Duration) -> Option<Transition> {
        // Opened as if `timeout - open_for` ago, so the usual timeout check ends it on time.
        let since = now.checked_sub(self.cfg.timeout.saturating_sub(open_for)).unwrap_or(now);
        (self.state == BreakerState::Closed).then(|| self.go(BreakerState::Open { since }, now))
    }

    /// Forces the breaker Closed with a clean streak (an operator's reset). Returns the transition
    /// when it was not Closed already. Outstanding permits become stale.
    pub fn reset(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Closed {
            self.consecutive_failures = 0;
            self.epoch += 1;
            return None;
        }
        Some(self.go(BreakerState::Closed, now))
    }

    /// State and counters for the admin API.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let state = self.state(now);
        let (half_open_in_flight, half_open_successes) = match state {
            BreakerState::HalfOpen { in_flight, successes } => (in_flight, successes),
            _ => (0, 0),
        };
        let retry_after_ms = match state {
            BreakerState::Open { since } => Some(as_ms((since + self.cfg.timeout).saturating_duration_since(now))),
            _ => None,
        };
        BreakerSnapshot {
            state: state.name(),
            consecutive_failures: self.consecutive_failures,
            half_open_in_flight,
            half_open_successes,
            retry_after_ms,
            counters: self.counters,
            last_transition: self.last_transition.map(|t| TransitionSnapshot {
                from: t.from,
                to: t.to,
                ago_ms: as_ms(now.saturating_duration_since(t.at)),
            }),
        }
    }
}

fn as_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use StateName::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::default())
    }

    fn fail(b: &mut CircuitBreaker, now: Instant) -> Option<Transition> {
        let p = b.try_acquire(now).unwrap();
        b.on_failure(p, now)
    }

    fn succeed(b: &mut CircuitBreaker, now: Instant) -> Option<Transition> {
        let p = b.try_acquire(now).unwrap();
        b.on_success(p, now)
    }

    fn opened(t0: Instant) -> CircuitBreaker {
        let mut b = breaker();
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        let t = fail(&mut b, t0).unwrap();
        assert_eq!((t.from, t.to, t.at), (Closed, Open, t0));
        b
    }

    #[test]
    fn consecutive_failures_open_and_a_success_resets_the_streak() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..4 {
            fail(&mut b, t0);
        }
        succeed(&mut b, t0);
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(fail(&mut b, t0).map(|t| t.to), Some(Open));
        assert_eq!(b.state(t0), BreakerState::Open { since: t0 });
        assert_eq!(b.counters(), BreakerCounters { successes: 1, failures: 9, rejections: 0, cancels: 0, opens: 1 });
    }

    #[test]
    fn open_rejects_until_timeout_then_half_opens() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let r = b.try_acquire(t0 + secs(10)).unwrap_err();
        assert_eq!(r, Rejected { state: Open, retry_after: secs(20) });
        assert!(!b.would_admit(t0 + secs(29)));
        // state() is a view: it already says HalfOpen, the transition happens on the next acquire.
        assert_eq!(b.state(t0 + secs(30)), BreakerState::HalfOpen { in_flight: 0, successes: 0 });
        assert_eq!(b.last_transition().map(|t| t.to), Some(Open));
        let p = b.try_acquire(t0 + secs(30)).unwrap();
        assert!(p.is_trial());
        let t = p.transition.unwrap();
        assert_eq!((t.from, t.to, t.at), (Open, HalfOpen, t0 + secs(30)));
        assert_eq!(b.counters().rejections, 1);
        b.on_cancel(p);
    }

    #[test]
    fn half_open_caps_concurrent_trials_and_closes_after_successes() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + secs(30);
        let trials: Vec<Permit> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        assert!(trials.iter().all(Permit::is_trial));
        assert_eq!(b.try_acquire(t1).unwrap_err(), Rejected { state: HalfOpen, retry_after: Duration::ZERO });
        assert!(!b.would_admit(t1));
        let mut trials = trials.into_iter();
        assert_eq!(b.on_success(trials.next().unwrap(), t1), None);
        assert_eq!(b.state(t1), BreakerState::HalfOpen { in_flight: 2, successes: 1 });
        // A freed slot admits a new trial.
        let p4 = b.try_acquire(t1).unwrap();
        assert_eq!(b.on_success(trials.next().unwrap(), t1), None);
        let t = b.on_success(trials.next().unwrap(), t1 + secs(1)).unwrap();
        assert_eq!((t.from, t.to), (HalfOpen, Closed));
        assert_eq!(b.state(t1), BreakerState::Closed);
        // The fourth trial's late result belongs to a finished round: counted, no effect.
        assert_eq!(b.on_failure(p4, t1), None);
        assert_eq!(b.snapshot(t1).consecutive_failures, 0);
    }

    #[test]
    fn one_trial_failure_reopens() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + secs(30);
        let a = b.try_acquire(t1).unwrap();
        let c = b.try_acquire(t1).unwrap();
        b.on_success(a, t1);
        let t = b.on_failure(c, t1 + secs(2)).unwrap();
        assert_eq!((t.from, t.to), (HalfOpen, Open));
        assert_eq!(b.state(t1 + secs(2)), BreakerState::Open { since: t1 + secs(2) });
        assert_eq!(b.counters().opens, 2);
        assert!(b.try_acquire(t1 + secs(31)).is_err());
        assert!(b.try_acquire(t1 + secs(32)).unwrap().is_trial());
    }

    #[test]
    fn cancel_frees_a_slot_without_a_verdict() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + secs(30);
        let ps: Vec<Permit> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        assert!(b.try_acquire(t1).is_err());
        for p in ps {
            b.on_cancel(p);
        }
        assert_eq!(b.state(t1), BreakerState::HalfOpen { in_flight: 0, successes: 0 });
        assert_eq!(b.counters().cancels, 3);
        // Overloaded is a cancel through on_outcome; ClientError a success.
        let p = b.try_acquire(t1).unwrap();
        assert_eq!(b.on_outcome(p, OutcomeKind::Overloaded, t1), None);
        for _ in 0..2 {
            let p = b.try_acquire(t1).unwrap();
            assert_eq!(b.on_outcome(p, OutcomeKind::ClientError, t1), None);
        }
        let p = b.try_acquire(t1).unwrap();
        assert_eq!(b.on_outcome(p, OutcomeKind::Success, t1).map(|t| t.to), Some(Closed));
        // A non-trial cancel does not touch the streak.
        for _ in 0..4 {
            fail(&mut b, t1);
        }
        let p = b.try_acquire(t1).unwrap();
        b.on_cancel(p);
        let p = b.try_acquire(t1).unwrap();
        assert_eq!(b.on_outcome(p, OutcomeKind::Timeout, t1).map(|t| t.to), Some(Open));
    }

    #[test]
    fn late_results_from_an_earlier_state_are_ignored() {
        let t0 = Instant::now();
        let mut b = breaker();
        let early: Vec<Permit> = (0..5).map(|_| b.try_acquire(t0).unwrap()).collect();
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        // Late failures and successes while Open change nothing.
        for p in early {
            assert_eq!(b.on_success(p, t0), None);
        }
        let p = b.try_acquire(t0 + secs(30)).unwrap();
        assert_eq!(b.on_success(p, t0 + secs(30)), None);
        assert_eq!(b.state(t0 + secs(30)), BreakerState::HalfOpen { in_flight: 0, successes: 1 });
    }

    #[test]
    fn an_unreported_round_expires_after_timeout() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + secs(30);
        let leaked: Vec<Permit> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        assert!(b.try_acquire(t1 + secs(29)).is_err());
        assert!(b.would_admit(t1 + secs(30)));
        let p = b.try_acquire(t1 + secs(30)).unwrap();
        assert_eq!(p.transition.map(|t| (t.from, t.to)), Some((HalfOpen, HalfOpen)));
        for old in leaked {
            b.on_failure(old, t1 + secs(31)); // stale: no reopen
        }
        assert_eq!(b.state(t1 + secs(31)), BreakerState::HalfOpen { in_flight: 1, successes: 0 });
        b.on_cancel(p);
    }

    #[test]
    fn reset_forces_closed() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t = b.reset(t0 + secs(1)).unwrap();
        assert_eq!((t.from, t.to), (Open, Closed));
        assert!(b.try_acquire(t0 + secs(1)).is_ok_and(|p| !p.is_trial()));
        // Reset while closed clears the streak without a transition.
        for _ in 0..4 {
            fail(&mut b, t0);
        }
        assert_eq!(b.reset(t0), None);
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        // Reset from half-open.
        fail(&mut b, t0);
        let p = b.try_acquire(t0 + secs(30)).unwrap();
        assert_eq!(b.reset(t0 + secs(30)).map(|t| t.from), Some(HalfOpen));
        assert_eq!(b.on_failure(p, t0 + secs(30)), None);
        assert_eq!(b.state(t0 + secs(30)), BreakerState::Closed);
    }

    #[test]
    fn zero_config_is_sane_and_snapshot_serialises() {
        let t0 = Instant::now();
        let cfg = BreakerConfig { failure_threshold: 0, success_threshold: 0, timeout: secs(1), half_open_requests: 0 };
        let mut b = CircuitBreaker::new(cfg);
        assert_eq!(fail(&mut b, t0).map(|t| t.to), Some(Open));
        let t1 = t0 + secs(1);
        let p = b.try_acquire(t1).unwrap();
        assert!(p.is_trial());
        assert!(b.try_acquire(t1).is_err());
        assert_eq!(b.on_success(p, t1).map(|t| t.to), Some(Closed));
        // A zero timeout half-opens at once (and a full round expires at once too).
        b.reconfigure(BreakerConfig { timeout: Duration::ZERO, ..cfg });
        assert_eq!(fail(&mut b, t1).map(|t| t.to), Some(Open));
        assert!(b.try_acquire(t1).unwrap().transition.is_some_and(|t| t.to == HalfOpen));

        let mut b = opened(t0);
        let snap = b.snapshot(t0 + secs(5));
        assert_eq!(snap.state, Open);
        assert_eq!(snap.retry_after_ms, Some(25_000));
        assert_eq!(snap.last_transition, Some(TransitionSnapshot { from: Closed, to: Open, ago_ms: 5_000 }));
        fn is_serialize<T: Serialize>(_: &T) {}
        is_serialize(&snap);
        let p = b.try_acquire(t0 + secs(30)).unwrap();
        let snap = b.snapshot(t0 + secs(30));
        assert_eq!((snap.state, snap.half_open_in_flight), (HalfOpen, 1));
        b.on_cancel(p);
        assert_eq!(StateName::HalfOpen.as_str(), "half_open");
    }

    #[test]
    fn trip_opens_only_a_closed_breaker() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::default();
        let t = b.trip(t0).expect("closed trips");
        assert_eq!((t.from, t.to), (StateName::Closed, StateName::Open));
        assert_eq!(b.counters().opens, 1);
        assert!(b.try_acquire(t0).is_err());
        assert_eq!(b.trip(t0), None, "already open");
    }

    #[test]
    fn trip_for_opens_for_the_time_left_at_most_its_own_timeout() {
        // Started well after the clock's origin, so `now - timeout` exists.
        let t0 = Instant::now() + secs(60);
        let mut b = CircuitBreaker::default();
        let mut p = b.try_acquire(t0).unwrap();
        b.on_failure(p, t0);
        let t = b.trip_for(t0, secs(10)).expect("closed trips");
        assert_eq!((t.from, t.to), (Closed, Open));
        assert_eq!(b.snapshot(t0).retry_after_ms, Some(10_000), "open for the time the other had left");
        assert_eq!(b.counters().failures, 1, "no failure of its own is counted");
        assert!(b.try_acquire(t0 + secs(9)).is_err());
        p = b.try_acquire(t0 + secs(10)).expect("a trial after the time left, not after its own 30 s");
        assert!(p.is_trial());
        assert_eq!(b.trip_for(t0 + secs(10), secs(5)), None, "half-open is left alone (it probes for itself)");
        let mut longer = CircuitBreaker::default();
        longer.trip_for(t0, secs(300));
        assert_eq!(longer.snapshot(t0).retry_after_ms, Some(30_000), "never longer than its own timeout");
        b.on_cancel(p);
    }
}
