//! Windowed estimators in fixed memory: dispatch rate (for `Retry-After` and `X-Estimated-Wait`),
//! recent error rate, and average queue wait.
//!
//! # Why
//! A queued client wants to know how long it will wait; the gateway knows its position and how fast
//! the queue has been draining. The dashboard and health logic want a worker's recent error share and
//! the queue's recent average wait. All three are "sum of something over the last `window`".
//!
//! # Algorithm
//! A ring of `buckets` slots, each covering `window / buckets` of time and tagged with its bucket
//! number (`(now - origin) / width`, origin = the first record). Recording adds into the slot of
//! `now`'s bucket, resetting it first if it still holds an older bucket. Reading sums the slots whose
//! bucket lies in the last `buckets` buckets. Memory is fixed at construction and nothing needs a
//! timer: stale slots are simply ignored, then overwritten. The window is therefore exact to one bucket.
//!
//! Clock going backwards: a record older than the window is dropped, one inside it lands in its own
//! bucket; reads use the latest bucket ever recorded if `now` is earlier, so a stale `now` neither
//! panics nor hides recent events.
//!
//! [`RateEstimator::per_sec`] divides the count by the time the window actually covers: since the
//! first record while the estimator is younger than the window (at least one bucket, so a burst of
//! events at start-up does not read as an infinite rate).

use std::time::{Duration, Instant};

/// The origin's bucket number: leaves room below for records from before the origin.
const ORIGIN_BUCKET: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, Default)]
struct Slot<V> {
    /// Bucket number + 1; 0 = never used.
    tag: u64,
    value: V,
}

/// Fixed ring of time buckets; see the module docs.
#[derive(Debug, Clone)]
struct Ring<V> {
    width_nanos: u64,
    origin: Option<Instant>,
    slots: Vec<Slot<V>>,
    latest: u64,
}

impl<V: Copy + Default> Ring<V> {
    fn new(window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let width = u64::try_from(window.as_nanos() / buckets as u128).unwrap_or(u64::MAX).max(1);
        Self { width_nanos: width, origin: None, slots: vec![Slot::default(); buckets], latest: ORIGIN_BUCKET }
    }

    fn n(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Bucket number of `now`: [`ORIGIN_BUCKET`] at the origin, lower before it (clock going back).
    fn bucket(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else { return ORIGIN_BUCKET };
        // In u64 (584 years of nanoseconds): a u128 division is a library call, on every record.
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if now >= origin {
            ORIGIN_BUCKET.saturating_add(nanos(now - origin) / self.width_nanos).min(u64::MAX - 1)
        } else {
            ORIGIN_BUCKET.saturating_sub(nanos(origin - now).div_ceil(self.width_nanos))
        }
    }

    fn add(&mut self, now: Instant, f: impl FnOnce(&mut V)) {
        self.origin.get_or_insert(now);
        let b = self.bucket(now);
        if b.saturating_add(self.n()) <= self.latest {
            return; // older than the window
        }
        let i = (b % self.n()) as usize;
        let slot = &mut self.slots[i];
        if slot.tag != b + 1 {
            *slot = Slot { tag: b + 1, value: V::default() };
        }
        f(&mut slot.value);
        self.latest = self.latest.max(b);
    }

    /// The newest bucket a read at `now` covers.
    fn head(&self, now: Instant) -> u64 {
        self.bucket(now).max(self.latest)
    }

    fn fold<A>(&self, now: Instant, init: A, mut f: impl FnMut(A, &V) -> A) -> A {
        if self.origin.is_none() {
            return init;
        }
        let head = self.head(now);
        let mut acc = init;
        for s in &self.slots {
            if s.tag != 0 && s.tag - 1 <= head && s.tag - 1 + self.n() > head {
                acc = f(acc, &s.value);
            }
        }
        acc
    }

    /// The instant the window of a read at `now` starts (never before the origin).
    fn window_start(&self, now: Instant) -> Option<Instant> {
        let origin = self.origin?;
        let first_bucket = (self.head(now) + 1).saturating_sub(self.n()).max(ORIGIN_BUCKET);
        let offset = u128::from(first_bucket - ORIGIN_BUCKET) * u128::from(self.width_nanos);
        Some(origin + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX)))
    }
}

/// Dispatches per second over a sliding window, and the wait it implies for a queue position.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    ring: Ring<u64>,
    last: Option<Instant>,
    fallback_per_position: Duration,
    max_wait: Duration,
}

impl Default for RateEstimator {
    /// A 60 s window of 1 s buckets; 1 s per position while the rate is unknown; waits capped at 300 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(60), 60)
    }
}

impl RateEstimator {
    /// A `window` cut into `buckets` buckets, with the default fallback (1 s per position, cap 300 s).
    pub fn new(window: Duration, buckets: usize) -> Self {
        Self {
            ring: Ring::new(window, buckets),
            last: None,
            fallback_per_position: Duration::from_secs(1),
            max_wait: Duration::from_secs(300),
        }
    }

    /// Sets the wait per position assumed while no dispatch has been seen in the window, and the cap of
    /// every estimate.
    pub fn with_fallback(mut self, per_position: Duration, max_wait: Duration) -> Self {
        self.fallback_per_position = per_position;
        self.max_wait = max_wait;
        self
    }

    /// Counts one dispatch at `now`.
    pub fn record(&mut self, now: Instant) {
        self.ring.add(now, |c| *c += 1);
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Dispatches per second over the window (0 when none was seen in it).
    pub fn per_sec(&self, now: Instant) -> f64 {
        let count = self.ring.fold(now, 0u64, |a, c| a + c);
        let (Some(start), Some(last)) = (self.ring.window_start(now), self.last) else {
            return 0.0;
        };
        if count == 0 {
            return 0.0;
        }
        let width = Duration::from_nanos(self.ring.width_nanos);
        let span = now.max(last).saturating_duration_since(start).max(width);
        count as f64 / span.as_secs_f64()
    }

    /// Estimated wait of the request at 1-based `position`: `position / per_sec`, or
    /// `position * fallback` when the rate is unknown; at most `max_wait`; zero for position 0.
    pub fn estimated_wait(&self, position: usize, now: Instant) -> Duration {
        if position == 0 {
            return Duration::ZERO;
        }
        let rate = self.per_sec(now);
        let secs = if rate > 0.0 {
            position as f64 / rate
        } else {
            position as f64 * self.fallback_per_position.as_secs_f64()
        };
        if !secs.is_finite() || secs >= self.max_wait.as_secs_f64() {
            return self.max_wait;
        }
        Duration::from_secs_f64(secs)
    }
}

/// The share of failures among the outcomes of the last `window`.
#[derive(Debug, Clone)]
pub struct SlidingErrorRate {
    ring: Ring<(u64, u64)>,
}

impl Default for SlidingErrorRate {
    /// 30 s in 1 s buckets.
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

impl SlidingErrorRate {
    /// A `window` in 1 s buckets (at least one).
    pub fn new(window: Duration) -> Self {
        let buckets = usize::try_from(window.as_secs().max(1)).unwrap_or(usize::MAX);
        Self { ring: Ring::new(Duration::from_secs(buckets as u64), buckets) }
    }

    /// Counts one outcome at `now`.
    pub fn record(&mut self, now: Instant, failed: bool) {
        self.ring.add(now, |(total, failures)| {
            *total += 1;
            *failures += u64::from(failed);
        });
    }

    /// `(outcomes, failures)` in the window (callers may want a minimum volume before acting).
    pub fn counts(&self, now: Instant) -> (u64, u64) {
        self.ring.fold(now, (0, 0), |(t, f), &(dt, df)| (t + dt, f + df))
    }

    /// Failures / outcomes in the window, 0 when there were none.
    pub fn rate(&self, now: Instant) -> f64 {
        match self.counts(now) {
            (0, _) => 0.0,
            (total, failures) => failures as f64 / total as f64,
        }
    }
}

/// Average of waits recorded over the last hour (by default 60 one-minute buckets).
#[derive(Debug, Clone)]
pub struct AvgWait {
    ring: Ring<(u64, u128)>,
}

impl Default for AvgWait {
    fn default() -> Self {
        Self::new(Duration::from_secs(3_600), 60)
    }
}

impl AvgWait {
    /// A `window` cut into `buckets` buckets.
    pub fn new(window: Duration, buckets: usize) -> Self {
        Self { ring: Ring::new(window, buckets) }
    }

    /// Counts one wait that ended at `now`.
    pub fn record(&mut self, now: Instant, wait: Duration) {
        self.ring.add(now, |(n, sum)| {
            *n += 1;
            *sum += wait.as_nanos();
        });
    }

    /// The mean wait in the window, `None` when none was recorded.
    pub fn average(&self, now: Instant) -> Option<Duration> {
        let (n, sum) = self.ring.fold(now, (0u64, 0u128), |(n, s), &(dn, ds)| (n + dn, s + ds));
        (n > 0).then(|| Duration::from_nanos(u64::try_from(sum / u128::from(n)).unwrap_or(u64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn rate_unknown_falls_back_to_one_second_per_position_capped() {
        let t0 = Instant::now();
        let r = RateEstimator::default();
        assert_eq!(r.per_sec(t0), 0.0);
        assert_eq!(r.estimated_wait(0, t0), Duration::ZERO);
        assert_eq!(r.estimated_wait(3, t0), secs(3));
        assert_eq!(r.estimated_wait(10_000, t0), secs(300));
        let r = RateEstimator::default().with_fallback(ms(500), secs(10));
        assert_eq!(r.estimated_wait(4, t0), secs(2));
        assert_eq!(r.estimated_wait(40, t0), secs(10));
    }

    #[test]
    fn steady_rate_is_measured_and_expires() {
        let t0 = Instant::now();
        let mut r = RateEstimator::default();
        // 10 dispatches per second for 2 minutes.
        for i in 0..1_200 {
            r.record(t0 + ms(i * 100));
        }
        let now = t0 + secs(120);
        let rate = r.per_sec(now);
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
        let wait = r.estimated_wait(20, now);
        assert!(wait > ms(1_900) && wait < ms(2_100), "{wait:?}");
        // A minute of silence: unknown again.
        assert_eq!(r.per_sec(now + secs(61)), 0.0);
        assert_eq!(r.estimated_wait(2, now + secs(61)), secs(2));
    }

    #[test]
    fn young_estimator_uses_the_time_it_has_seen() {
        let t0 = Instant::now();
        let mut r = RateEstimator::default();
        for i in 0..5 {
            r.record(t0 + ms(i * 100));
        }
        // Five events in 0.4 s read as 5/s (span floored at one bucket), not 12.5/s or 5/60 s.
        assert!((r.per_sec(t0 + ms(400)) - 5.0).abs() < 1e-9);
        for i in 0..5 {
            r.record(t0 + secs(5) + ms(i * 100));
        }
        // Ten events over 10 s.
        assert!((r.per_sec(t0 + secs(10)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn clock_backwards_neither_panics_nor_hides_events() {
        let t0 = Instant::now() + secs(1_000);
        let mut r = RateEstimator::default();
        r.record(t0 + secs(10));
        r.record(t0 + secs(5));
        r.record(t0 - secs(500)); // before the origin, older than the window: dropped
                                  // Two events, span floored at one bucket.
        assert_eq!(r.per_sec(t0), 2.0);
        assert_eq!(r.per_sec(t0 - secs(900)), 2.0);
        let mut e = SlidingErrorRate::default();
        e.record(t0 + secs(100), true);
        e.record(t0 + secs(10), false); // older than the window: dropped
        e.record(t0 + secs(90), false); // within it, before the origin: counted
        assert_eq!(e.counts(t0 + secs(100)), (2, 1));
        assert_eq!(e.rate(t0), 0.5);
        assert_eq!(e.counts(t0 + secs(121)), (1, 1));
    }

    #[test]
    fn error_rate_slides() {
        let t0 = Instant::now();
        let mut e = SlidingErrorRate::new(secs(30));
        assert_eq!(e.rate(t0), 0.0);
        for i in 0..10 {
            e.record(t0 + ms(i * 100), true);
            e.record(t0 + ms(i * 100), false);
        }
        assert_eq!(e.rate(t0 + secs(1)), 0.5);
        for i in 0..10 {
            e.record(t0 + secs(20) + ms(i), false);
        }
        assert_eq!(e.counts(t0 + secs(20)), (30, 10));
        // The failures at t0 leave the window after 30 s; the successes at 20 s stay.
        assert_eq!(e.counts(t0 + secs(30)), (10, 0));
        assert_eq!(e.rate(t0 + secs(30)), 0.0);
        assert_eq!(e.counts(t0 + secs(50)), (0, 0));
        // Fixed memory, whatever was recorded.
        for i in 0..10_000 {
            e.record(t0 + secs(60) + ms(i * 37), i % 3 == 0);
        }
        assert_eq!(e.ring.slots.len(), 30);
    }

    #[test]
    fn average_wait_over_the_last_hour() {
        let t0 = Instant::now();
        let mut w = AvgWait::default();
        assert_eq!(w.average(t0), None);
        w.record(t0, secs(1));
        w.record(t0 + secs(30 * 60), secs(3));
        assert_eq!(w.average(t0 + secs(30 * 60)), Some(secs(2)));
        // The first leaves after an hour.
        assert_eq!(w.average(t0 + secs(61 * 60)), Some(secs(3)));
        assert_eq!(w.average(t0 + secs(100 * 60)), None);
        assert_eq!(w.ring.slots.len(), 60);
    }

    #[test]
    fn degenerate_windows_do_not_panic() {
        let t0 = Instant::now();
        let mut r = RateEstimator::new(Duration::ZERO, 0);
        r.record(t0);
        let _ = r.estimated_wait(5, t0 + secs(1));
        let mut e = SlidingErrorRate::new(Duration::ZERO);
        e.record(t0, true);
        assert_eq!(e.rate(t0), 1.0);
        let mut w = AvgWait::new(Duration::MAX, 7);
        w.record(t0, Duration::MAX);
        assert!(w.average(t0 + secs(1)).is_some());
    }
}
