//! Rate limits: a lazily refilled token bucket, and a fixed-window counter for daily quotas.
//!
//! # Why
//! The gateway limits requests and tokens per API key and per model. Token costs are only estimated
//! when a request is admitted (prompt chars / 4 + `max_tokens`) and known exactly when its stream ends,
//! so the bucket can be reconciled afterwards: [`TokenBucket::give_back`] returns an over-estimate,
//! [`TokenBucket::take_debt`] charges an under-estimate (the level may go negative, so later requests
//! wait until the debt is repaid by the refill).
//!
//! # Algorithm
//! The bucket holds `level` tokens, at most `burst`, and remembers the instant `last` it was refilled.
//! Every call first refills lazily: `level = min(burst, level + rate * (now - last))`, then acts. There
//! is no timer. A `now` earlier than `last` (a caller's clock going backwards, or two threads' `now`s
//! racing into the lock) adds nothing and leaves `last` where it was, so it can never mint tokens.
//!
//! Edge cases, decided once here:
//! - `rate = 0`: the bucket never refills; its `burst` is all it will ever give.
//! - `rate = +inf`: unlimited; every `try_take` is admitted and nothing is deducted.
//! - `n > burst`: no wait can ever admit it. It is denied with [`Denied::never`] set and
//!   `retry_after` = [`MAX_RETRY_AFTER`]; the gateway should answer "request too large", not 429.
//! - Every `retry_after` is finite and capped at [`MAX_RETRY_AFTER`] (so `now + retry_after` never
//!   overflows), and rounded up so that waiting exactly that long admits the same request.
//! - Negative or NaN rates, bursts and amounts are treated as 0.
//!
//! # Daily quotas
//! "Requests per day" is a [`WindowCounter`]: a fixed window keyed by the window number
//! `unix_secs / window_secs` (UTC days for [`WindowCounter::per_day`]), not a bucket with
//! `rate = limit / 86400`. A quota that resets at midnight UTC is what users expect to read in
//! `x-ratelimit-reset-requests`, needs O(1) memory, and a client that used its quota in the morning
//! is not trickled one request every `86400 / limit` seconds. The cost is the classic fixed-window
//! edge (up to twice the limit across midnight), acceptable for a daily quota; per-second and
//! per-minute limits use the token bucket, which has no such edge.

use std::time::{Duration, Instant};

/// The longest `retry_after` either limiter ever reports (one day): used when waiting cannot help.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// Why a take was refused, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// How long until the same request would be admitted (rounded up, at most [`MAX_RETRY_AFTER`]).
    pub retry_after: Duration,
    /// Waiting will never admit this request: it asks for more than the burst (or the window's
    /// limit), or the rate is zero. `retry_after` is then [`MAX_RETRY_AFTER`].
    pub never: bool,
}

impl Denied {
    fn forever() -> Self {
        Self { retry_after: MAX_RETRY_AFTER, never: true }
    }
}

/// Replaces NaN and negatives by 0; keeps `+inf`.
fn sane(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        0.0
    } else {
        x
    }
}

/// `deficit / rate` seconds as a Duration, rounded up to the next nanosecond plus one, capped.
fn wait_for(deficit: f64, rate: f64) -> Duration {
    if deficit <= 0.0 {
        return Duration::ZERO;
    }
    let nanos = (deficit / rate * 1e9).ceil() + 1.0;
    if !nanos.is_finite() || nanos >= MAX_RETRY_AFTER.as_nanos() as f64 {
        return MAX_RETRY_AFTER;
    }
    Duration::from_nanos(nanos as u64)
}

/// A token bucket refilled lazily at `rate_per_sec` up to `burst`; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    level: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate_per_sec` tokens per second, holding at most `burst`.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        let burst = sane(burst);
        Self { rate_per_sec: sane(rate_per_sec), burst, level: burst, last: now }
    }

    /// Tokens added per second.
    pub fn rate_per_sec(&self) -> f64 {
        self.rate_per_sec
    }

    /// The most tokens the bucket holds.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    fn unlimited(&self) -> bool {
        self.rate_per_sec == f64::INFINITY
    }

    fn refill(&mut self, now: Instant) {
        // A `now` at or before `last` adds nothing and does not move `last` back.
        let Some(elapsed) = now.checked_duration_since(self.last).filter(|d| !d.is_zero()) else {
            return;
        };
        self.last = now;
        if self.level < self.burst {
            // `rate = inf` gives `inf`, which the `min` turns into `burst`; elapsed > 0 so no `0 * inf`.
            self.level = (self.level + self.rate_per_sec * elapsed.as_secs_f64()).min(self.burst);
        }
    }

    /// Whether `n` tokens could be taken now, without taking them: `Ok`, or how long to wait. Lets a
    /// caller check every bucket a request needs before charging any (no take-then-give-back).
    pub fn check(&mut self, n: f64, now: Instant) -> Result<(), Denied> {
        let n = sane(n);
        if self.unlimited() || n == 0.0 {
            return Ok(());
        }
        self.refill(now);
        if n > self.burst {
            return Err(Denied::forever());
        }
        if self.level >= n {
            return Ok(());
        }
        if self.rate_per_sec == 0.0 {
            return Err(Denied::forever());
        }
        Err(Denied { retry_after: wait_for(n - self.level, self.rate_per_sec), never: false })
    }

    /// Takes `n` tokens if the bucket holds them now; otherwise takes nothing and says how long to wait.
    pub fn try_take(&mut self, n: f64, now: Instant) -> Result<(), Denied> {
        self.check(n, now)?;
        let n = sane(n);
        if !self.unlimited() {
            self.level -= n;
        }
        Ok(())
    }

    /// Returns `n` tokens taken for an over-estimate; the level stays at most `burst`.
    pub fn give_back(&mut self, n: f64) {
        let n = sane(n);
        if n > 0.0 && self.level < self.burst {
            self.level = (self.level + n).min(self.burst);
        }
    }

    /// Charges `n` more tokens for an under-estimate, even if the bucket does not hold them: the level
    /// may go negative (without bound), and later takes wait until the refill has repaid the debt.
    pub fn take_debt(&mut self, n: f64, now: Instant) {
        let n = sane(n);
        if self.unlimited() || n == 0.0 {
            return;
        }
        self.refill(now);
        self.level -= n;
    }

    /// Tokens available now (0 while in debt), e.g. for `x-ratelimit-remaining-tokens`.
    pub fn remaining(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level.max(0.0)
    }

    /// Time until the bucket is full again (zero when full; [`MAX_RETRY_AFTER`] when it never will be),
    /// e.g. for `x-ratelimit-reset-tokens`.
    pub fn reset_after(&mut self, now: Instant) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.level >= self.burst {
            return Duration::ZERO;
        }
        if self.rate_per_sec == 0.0 {
            return MAX_RETRY_AFTER;
        }
        wait_for(self.burst - self.level, self.rate_per_sec)
    }

    /// Changes rate and burst (a config reload), keeping the current level, capped at the new burst.
    /// Tokens earned until `now` are earned at the old rate.
    pub fn reconfigure(&mut self, rate_per_sec: f64, burst: f64, now: Instant) {
        self.refill(now);
        self.rate_per_sec = sane(rate_per_sec);
        self.burst = sane(burst);
        if self.unlimited() {
            self.level = self.burst;
        }
        self.level = self.level.min(self.burst);
    }
}

/// A fixed-window counter: at most `limit` units per window `unix_secs / window_secs`.
///
/// Takes a caller-given unix time in seconds (not an `Instant`), since its windows are calendar
/// windows. A time earlier than the current window's start is counted in the current window, so a
/// clock stepping back cannot reopen an exhausted window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCounter {
    limit: u64,
    window_secs: u64,
    window: u64,
    used: u64,
}

impl WindowCounter {
    /// At most `limit` units per window of `window_secs` seconds (0 is taken as 1).
    pub fn new(limit: u64, window_secs: u64) -> Self {
        Self { limit, window_secs: window_secs.max(1), window: 0, used: 0 }
    }

    /// At most `limit` units per UTC day.
    pub fn per_day(limit: u64) -> Self {
        Self::new(limit, 86_400)
    }

    /// The limit per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn roll(&mut self, unix_secs: u64) {
        let window = unix_secs / self.window_secs;
        if window > self.window {
            self.window = window;
            self.used = 0;
        }
    }

    /// Counts `n` units if the current window has room for them; otherwise counts nothing.
    pub fn try_take(&mut self, n: u64, unix_secs: u64) -> Result<(), Denied> {
        self.roll(unix_secs);
        if n > self.limit {
            return Err(Denied::forever());
        }
        if self.used.saturating_add(n) <= self.limit {
            self.used += n;
            return Ok(());
        }
        Err(Denied { retry_after: self.reset_after(unix_secs), never: false })
    }

    /// Uncounts `n` units (e.g. a request refused further down the line).
    pub fn give_back(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    /// Units left in the current window.
    pub fn remaining(&mut self, unix_secs: u64) -> u64 {
        self.roll(unix_secs);
        self.limit.saturating_sub(self.used)
    }

    /// Time until the next window starts (at most one window, and at most [`MAX_RETRY_AFTER`]).
    pub fn reset_after(&mut self, unix_secs: u64) -> Duration {
        self.roll(unix_secs);
        let end = self.window.saturating_add(1).saturating_mul(self.window_secs);
        Duration::from_secs(end.saturating_sub(unix_secs.max(self.window * self.window_secs))).min(MAX_RETRY_AFTER)
    }

    /// Changes the limit (a config reload), keeping what was used in the current window.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn starts_full_and_refills_lazily() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert_eq!(b.remaining(t0), 5.0);
        for _ in 0..5 {
            b.try_take(1.0, t0).unwrap();
        }
        let denied = b.try_take(1.0, t0).unwrap_err();
        assert!(!denied.never);
        assert!(denied.retry_after > ms(99) && denied.retry_after <= ms(101), "{denied:?}");
        // Waiting exactly retry_after admits the same request.
        b.try_take(1.0, t0 + denied.retry_after).unwrap();
        // Refill is capped at burst.
        assert_eq!(b.remaining(t0 + Duration::from_secs(60)), 5.0);
        assert_eq!(b.reset_after(t0 + Duration::from_secs(60)), Duration::ZERO);
    }

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 4.0, t0);
        let admitted = (0..10).filter(|_| b.try_take(1.0, t0).is_ok()).count();
        assert_eq!(admitted, 4);
        // 2/s: one per 500 ms afterwards.
        assert!(b.try_take(1.0, t0 + ms(499)).is_err());
        assert!(b.try_take(1.0, t0 + ms(500)).is_ok());
        assert!(b.try_take(1.0, t0 + ms(600)).is_err());
        let reset = b.reset_after(t0 + ms(600));
        assert!(reset > ms(1_899) && reset <= ms(1_901), "{reset:?}");
    }

    #[test]
    fn clock_backwards_neither_panics_nor_mints() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 3.0, t1);
        b.try_take(3.0, t1).unwrap();
        assert!(b.try_take(1.0, t0).is_err());
        assert_eq!(b.remaining(t0), 0.0);
        assert!(b.reset_after(t0) > Duration::ZERO);
        b.take_debt(1.0, t0);
        // Back to t1 then forward: only time after t1 counts.
        assert!(b.try_take(1.0, t1 + ms(1_500)).is_err());
        b.try_take(1.0, t1 + ms(2_001)).unwrap();
    }

    #[test]
    fn zero_rate_gives_the_burst_only() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 2.0, t0);
        b.try_take(2.0, t0).unwrap();
        let d = b.try_take(1.0, t0 + Duration::from_secs(1_000_000)).unwrap_err();
        assert!(d.never);
        assert_eq!(d.retry_after, MAX_RETRY_AFTER);
        assert_eq!(b.reset_after(t0), MAX_RETRY_AFTER);
        // Zero burst and zero rate: nothing ever, but zero-cost takes pass.
        let mut z = TokenBucket::new(0.0, 0.0, t0);
        assert!(z.try_take(1.0, t0).unwrap_err().never);
        z.try_take(0.0, t0).unwrap();
    }

    #[test]
    fn infinite_or_huge_rate_always_admits() {
        let t0 = Instant::now();
        let mut inf = TokenBucket::new(f64::INFINITY, 1.0, t0);
        for i in 0..1000 {
            inf.try_take(1e12, t0 + ms(i % 3)).unwrap();
        }
        inf.take_debt(1e18, t0);
        assert_eq!(inf.remaining(t0), 1.0);
        assert_eq!(inf.reset_after(t0), Duration::ZERO);
        let mut huge = TokenBucket::new(1e300, 10.0, t0);
        for i in 1..1000 {
            huge.try_take(10.0, t0 + Duration::from_nanos(i)).unwrap();
        }
        let mut inf_burst = TokenBucket::new(1.0, f64::INFINITY, t0);
        inf_burst.try_take(1e300, t0).unwrap();
        assert_eq!(inf_burst.reset_after(t0), Duration::ZERO);
    }

    #[test]
    fn more_than_burst_is_denied_forever_not_looped() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 10.0, t0);
        let d = b.try_take(10.5, t0).unwrap_err();
        assert!(d.never);
        assert_eq!(d.retry_after, MAX_RETRY_AFTER);
        assert!(b.try_take(f64::INFINITY, t0).unwrap_err().never);
        // Nothing was taken.
        assert_eq!(b.remaining(t0), 10.0);
        // Garbage amounts are zero.
        b.try_take(f64::NAN, t0).unwrap();
        b.try_take(-5.0, t0).unwrap();
        assert_eq!(b.remaining(t0), 10.0);
    }

    #[test]
    fn give_back_and_debt_reconcile_estimates() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 100.0, t0);
        b.try_take(80.0, t0).unwrap();
        b.give_back(30.0); // used only 50
        assert_eq!(b.remaining(t0), 50.0);
        b.give_back(1_000.0);
        assert_eq!(b.remaining(t0), 100.0);
        b.take_debt(150.0, t0); // level -50
        assert_eq!(b.remaining(t0), 0.0);
        let d = b.try_take(10.0, t0).unwrap_err();
        assert!(d.retry_after > Duration::from_secs(6) && d.retry_after <= ms(6_001), "{d:?}");
        assert!(b.try_take(10.0, t0 + Duration::from_secs(5)).is_err());
        b.try_take(10.0, t0 + Duration::from_secs(6)).unwrap();
    }

    #[test]
    fn check_takes_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 2.0, t0);
        for _ in 0..5 {
            assert_eq!(b.check(2.0, t0), Ok(()));
        }
        assert_eq!(b.remaining(t0), 2.0);
        assert!(b.try_take(2.0, t0).is_ok());
        let d = b.check(1.0, t0).expect_err("empty");
        assert_eq!(d, b.try_take(1.0, t0).expect_err("empty"), "check and take agree");
        assert!(b.check(3.0, t0).expect_err("above the burst").never);
    }

    #[test]
    fn reconfigure_keeps_level_capped() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 100.0, t0);
        b.try_take(40.0, t0).unwrap();
        b.reconfigure(10.0, 200.0, t0 + Duration::from_secs(10)); // 70 at the old rate
        assert_eq!(b.remaining(t0 + Duration::from_secs(10)), 70.0);
        assert_eq!(b.remaining(t0 + Duration::from_secs(11)), 80.0);
        b.reconfigure(10.0, 30.0, t0 + Duration::from_secs(11));
        assert_eq!(b.remaining(t0 + Duration::from_secs(11)), 30.0);
        assert_eq!((b.rate_per_sec(), b.burst()), (10.0, 30.0));
        b.reconfigure(f64::NAN, -1.0, t0);
        assert_eq!((b.rate_per_sec(), b.burst()), (0.0, 0.0));
    }

    #[test]
    fn window_counter_resets_at_the_window_boundary() {
        let day = 86_400;
        let mut c = WindowCounter::per_day(3);
        let t = 20_000 * day + 3_600;
        for _ in 0..3 {
            c.try_take(1, t).unwrap();
        }
        let d = c.try_take(1, t + 10).unwrap_err();
        assert!(!d.never);
        assert_eq!(d.retry_after, Duration::from_secs(day - 3_610));
        assert_eq!(c.remaining(t), 0);
        // Clock backwards into the previous day does not reopen the quota.
        assert!(c.try_take(1, t - day).is_err());
        assert_eq!(c.reset_after(t - day), Duration::from_secs(day));
        c.give_back(1);
        c.try_take(1, t).unwrap();
        // Next day: fresh.
        assert_eq!(c.remaining(21_000 * day), 3);
        assert!(c.try_take(4, 21_000 * day).unwrap_err().never);
        c.set_limit(5);
        c.try_take(5, 21_000 * day).unwrap();
        assert_eq!(WindowCounter::new(1, 0).reset_after(7), Duration::from_secs(1));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take(f64),
        Debt(f64),
        GiveBackLast,
        Advance(u64),
        Back(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0.0f64..20.0).prop_map(Op::Take),
            1 => (0.0f64..5.0).prop_map(Op::Debt),
            1 => Just(Op::GiveBackLast),
            3 => (0u64..2_000).prop_map(Op::Advance),
            1 => (0u64..5_000).prop_map(Op::Back),
        ]
    }

    proptest! {
        /// At every admission, all tokens consumed so far (admitted + debt - given back) fit in
        /// `burst + rate * elapsed`, where elapsed counts only forward time.
        #[test]
        fn never_admits_more_than_burst_plus_refill(
            rate in 0.0f64..50.0,
            burst in 0.0f64..40.0,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t0 = Instant::now() + Duration::from_secs(3_600);
            let mut b = TokenBucket::new(rate, burst, t0);
            let (mut now, mut latest) = (t0, t0);
            let mut consumed = 0.0;
            let mut last_taken = 0.0;
            for op in ops {
                match op {
                    Op::Take(n) => {
                        if b.try_take(n, now).is_ok() {
                            consumed += n;
                            last_taken = n;
                            let allowed = burst + rate * (latest - t0).as_secs_f64();
                            prop_assert!(consumed <= allowed + 1e-6, "{consumed} > {allowed}");
                        }
                    }
                    Op::Debt(n) => { b.take_debt(n, now); consumed += n; }
                    Op::GiveBackLast => { b.give_back(last_taken); consumed -= last_taken; last_taken = 0.0; }
                    Op::Advance(d) => { now += ms(d); latest = latest.max(now); }
                    Op::Back(d) => { now -= ms(d); }
                }
                prop_assert!(b.remaining(now) <= burst);
            }
        }
    }
}
