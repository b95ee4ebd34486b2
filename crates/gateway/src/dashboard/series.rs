//! The per-second time series of one gateway, and the one [`Sampler`] that fills them.
//!
//! The sampler ticks every second and turns metric *deltas* into points: qps from the requests counter,
//! latency and TTFT quantiles from the bucket deltas of their histograms (linear interpolation inside
//! the bucket that holds the quantile, as Prometheus' `histogram_quantile` does). A second without
//! observations has no quantile (`null`: a gap in the chart, not a zero). Every buffer is bounded:
//! [`SERIES_LEN`] points for the charts, [`QPS_WINDOW`] of request totals for `/api/status`'s qps.
//!
//! One sampler per gateway, an [`crate::state::AppState`] field: two gateways in one process never
//! share one. Its task reads the metrics through a closure the caller gives ([`Sampler::start`]), so
//! this module needs nothing of the gateway's state; it ends when the closure answers `None` or the
//! gateway shuts down.

use crate::metrics::Metrics;
use parking_lot::Mutex;
use prometheus::core::Collector;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Points kept per series: five minutes at one point a second.
pub const SERIES_LEN: usize = 300;
/// How often the sampler takes a point.
pub const TICK: Duration = Duration::from_secs(1);
/// The window `/api/status`'s qps is measured over.
pub const QPS_WINDOW: Duration = Duration::from_secs(10);

/// The last [`SERIES_LEN`] points of each chart; a `None` quantile is a second without observations.
#[derive(Debug, Default, Clone)]
pub struct Series {
    /// Unix time of each point, ms.
    pub t: VecDeque<u64>,
    /// Requests answered per second.
    pub qps: VecDeque<f64>,
    /// Median request latency, ms.
    pub latency_p50_ms: VecDeque<Option<f64>>,
    /// 99th percentile request latency, ms.
    pub latency_p99_ms: VecDeque<Option<f64>>,
    /// Median time to first token, ms.
    pub ttft_p50_ms: VecDeque<Option<f64>>,
    /// 99th percentile time to first token, ms.
    pub ttft_p99_ms: VecDeque<Option<f64>>,
}

/// One point of every series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Unix time, ms.
    pub t: u64,
    /// Requests per second.
    pub qps: f64,
    /// Latency p50, ms.
    pub latency_p50_ms: Option<f64>,
    /// Latency p99, ms.
    pub latency_p99_ms: Option<f64>,
    /// TTFT p50, ms.
    pub ttft_p50_ms: Option<f64>,
    /// TTFT p99, ms.
    pub ttft_p99_ms: Option<f64>,
}

impl Series {
    /// Appends `p`, dropping the oldest point beyond [`SERIES_LEN`].
    pub fn push(&mut self, p: Point) {
        fn bounded<T>(q: &mut VecDeque<T>, v: T) {
            q.push_back(v);
            while q.len() > SERIES_LEN {
                q.pop_front();
            }
        }
        bounded(&mut self.t, p.t);
        bounded(&mut self.qps, round3(p.qps));
        bounded(&mut self.latency_p50_ms, p.latency_p50_ms.map(round3));
        bounded(&mut self.latency_p99_ms, p.latency_p99_ms.map(round3));
        bounded(&mut self.ttft_p50_ms, p.ttft_p50_ms.map(round3));
        bounded(&mut self.ttft_p99_ms, p.ttft_p99_ms.map(round3));
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.t.len()
    }

    /// No point yet.
    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// `{"t":[..],"qps":[..],"latency_p50_ms":[..],...}`, oldest first.
    pub fn to_json(&self) -> Value {
        json!({
            "t": self.t,
            "qps": self.qps,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "ttft_p50_ms": self.ttft_p50_ms,
            "ttft_p99_ms": self.ttft_p99_ms,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A histogram family summed over its label sets: upper bounds (without `+Inf`), cumulative count per
/// bound, and the total count (which includes the `+Inf` bucket).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Buckets {
    /// Upper bounds, ascending, seconds.
    pub bounds: Vec<f64>,
    /// Cumulative counts, one per bound.
    pub cumulative: Vec<u64>,
    /// Observations in all.
    pub count: u64,
}

impl Buckets {
    /// Reads a histogram family, summing its series (they share bounds).
    pub fn read(h: &prometheus::HistogramVec) -> Buckets {
        let mut out = Buckets::default();
        for mf in h.collect() {
            for m in mf.get_metric() {
                let hist = m.get_histogram();
                let buckets = hist.get_bucket();
                if out.bounds.is_empty() {
                    out.bounds = buckets.iter().map(|b| b.upper_bound()).collect();
                    out.cumulative = vec![0; out.bounds.len()];
                }
                for (slot, b) in out.cumulative.iter_mut().zip(buckets) {
                    *slot += b.cumulative_count();
                }
                out.count += hist.get_sample_count();
            }
        }
        out
    }

    /// The observations made since `earlier` (a counter reset or new bounds count as a fresh start).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        if earlier.bounds != self.bounds || earlier.count > self.count {
            return self.clone();
        }
        Buckets {
            bounds: self.bounds.clone(),
            cumulative: self.cumulative.iter().zip(&earlier.cumulative).map(|(a, b)| a.saturating_sub(*b)).collect(),
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile (0..1) of these observations, by linear interpolation inside its bucket (the
    /// first bucket's lower edge is 0); past the last bound, the last bound. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (&upper, &cum) in self.bounds.iter().zip(&self.cumulative) {
            if cum as f64 >= rank && cum > below {
                let in_bucket = (cum - below) as f64;
                return Some(lower + (upper - lower) * ((rank - below as f64) / in_bucket).clamp(0.0, 1.0));
            }
            lower = upper;
            below = cum;
        }
        self.bounds.last().copied()
    }
}

/// What one sampler tick reads: requests answered, and the latency and TTFT histograms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings {
    /// Requests answered so far.
    pub requests: u64,
    /// The latency histogram, summed over models.
    pub latency: Buckets,
    /// The TTFT histogram, summed over models.
    pub ttft: Buckets,
}

impl Readings {
    /// Reads them from `metrics`.
    pub fn of(metrics: &Metrics) -> Readings {
        Readings {
            requests: metrics.requests_total(),
            latency: Buckets::read(&metrics.latency),
            ttft: Buckets::read(&metrics.ttft),
        }
    }
}

/// The one per-second sampler of a gateway: the dashboard's series and the request totals of the last
/// [`QPS_WINDOW`], which `/api/status` turns into qps.
#[derive(Debug, Default)]
pub struct Sampler {
    started: AtomicBool,
    state: Mutex<Sampled>,
}

#[derive(Debug, Default)]
struct Sampled {
    series: Series,
    /// `(when, requests answered)`, one a tick, oldest first, at most `QPS_WINDOW` seconds + 1.
    totals: VecDeque<(Instant, u64)>,
    /// The previous tick's readings, which the next point is a delta from.
    last: Option<(Instant, Readings)>,
}

impl Sampler {
    /// A sampler that has not started.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts the sampling task unless it runs already: `read` gives the readings of a tick (`None`
    /// ends the task: the gateway is gone), `stop` ends it at shutdown.
    pub fn start(self: &Arc<Self>, read: impl FnMut() -> Option<Readings> + Send + 'static, stop: CancellationToken) {
        if stop.is_cancelled() || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(Arc::clone(self).run(read, stop));
    }

    async fn run(self: Arc<Self>, mut read: impl FnMut() -> Option<Readings>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(readings) = read() else { return };
            self.record(Instant::now(), readings, unix_ms());
        }
    }

    /// Takes one tick's readings: a point from their delta to the previous tick (the first tick only
    /// sets the baseline), and a request total for qps.
    pub fn record(&self, now: Instant, readings: Readings, unix_ms: u64) {
        let mut s = self.state.lock();
        s.totals.push_back((now, readings.requests));
        while s.totals.len() > QPS_WINDOW.as_secs() as usize + 1 {
            s.totals.pop_front();
        }
        if let Some((then, before)) = s.last.take() {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let d_lat = readings.latency.since(&before.latency);
            let d_tt = readings.ttft.since(&before.ttft);
            let ms = |b: &Buckets, q: f64| b.quantile(q).map(|s| s * 1000.0);
            s.series.push(Point {
                t: unix_ms,
                qps: readings.requests.saturating_sub(before.requests) as f64 / secs,
                latency_p50_ms: ms(&d_lat, 0.5),
                latency_p99_ms: ms(&d_lat, 0.99),
                ttft_p50_ms: ms(&d_tt, 0.5),
                ttft_p99_ms: ms(&d_tt, 0.99),
            });
        }
        s.last = Some((now, readings));
    }

    /// Requests per second over the last [`QPS_WINDOW`], given the total now. Until a sample half a
    /// second old exists, the average since `since` (the gateway's start).
    pub fn qps(&self, now: Instant, total: u64, since: Instant) -> f64 {
        let s = self.state.lock();
        let (t0, n0) = match s.totals.front() {
            Some(&(t, n)) if now.duration_since(t) >= Duration::from_millis(500) => (t, n),
            _ => (since, 0),
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            total.saturating_sub(n0) as f64 / secs
        }
    }

    /// The series as JSON (see [`Series::to_json`]).
    pub fn series_json(&self) -> Value {
        self.state.lock().series.to_json()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(bounds: &[f64], per_bucket: &[u64], overflow: u64) -> Buckets {
        let mut cum = 0;
        let cumulative = per_bucket
            .iter()
            .map(|n| {
                cum += n;
                cum
            })
            .collect();
        Buckets { bounds: bounds.to_vec(), cumulative, count: cum + overflow }
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        // 10 observations in (0, 0.1], 10 in (0.1, 0.2].
        let b = buckets(&[0.1, 0.2, 0.4], &[10, 10, 0], 0);
        assert_eq!(b.quantile(0.5), Some(0.1));
        let p75 = b.quantile(0.75).unwrap();
        assert!((p75 - 0.15).abs() < 1e-9, "{p75}");
        let p25 = b.quantile(0.25).unwrap();
        assert!((p25 - 0.05).abs() < 1e-9, "{p25}");
        assert_eq!(Buckets::default().quantile(0.5), None);
    }

    #[test]
    fn quantile_skips_empty_buckets_and_caps_at_the_last_bound() {
        let b = buckets(&[0.1, 0.2, 0.4], &[0, 0, 4], 0);
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 0.3).abs() < 1e-9, "{p50}");
        let over = buckets(&[0.1, 0.2], &[1, 0], 9);
        assert_eq!(over.quantile(0.99), Some(0.2));
    }

    #[test]
    fn deltas_and_resets() {
        let before = buckets(&[0.1, 0.2], &[5, 5], 1);
        let after = buckets(&[0.1, 0.2], &[5, 9], 1);
        let d = after.since(&before);
        assert_eq!(d, Buckets { bounds: vec![0.1, 0.2], cumulative: vec![0, 4], count: 4 });
        assert!(d.quantile(0.5).unwrap() > 0.1);
        assert_eq!(before.since(&after), before, "a reset starts afresh");
    }

    #[test]
    fn series_is_bounded() {
        let mut s = Series::default();
        for i in 0..(SERIES_LEN as u64 + 50) {
            s.push(Point {
                t: i,
                qps: 1.0,
                latency_p50_ms: None,
                latency_p99_ms: Some(2.0),
                ttft_p50_ms: None,
                ttft_p99_ms: None,
            });
        }
        assert_eq!(s.len(), SERIES_LEN);
        assert_eq!(s.t.front(), Some(&50));
        let v = s.to_json();
        assert_eq!(v["latency_p50_ms"][0], Value::Null);
        assert_eq!(v["qps"].as_array().map(Vec::len), Some(SERIES_LEN));
    }

    #[test]
    fn histogram_readings_sum_models() {
        let m = crate::metrics::Metrics::new().unwrap();
        m.latency.with_label_values(&["a"]).observe(0.02);
        m.latency.with_label_values(&["b"]).observe(0.03);
        m.latency.with_label_values(&["b"]).observe(1000.0);
        let b = Buckets::read(&m.latency);
        assert_eq!(b.count, 3);
        assert_eq!(b.cumulative.last(), Some(&2));
        let p50 = b.quantile(0.5).unwrap();
        assert!(p50 > 0.025 && p50 <= 0.05, "{p50}");
    }

    fn reading(requests: u64) -> Readings {
        Readings { requests, ..Readings::default() }
    }

    #[test]
    fn points_are_deltas_and_qps_spans_the_window() {
        let s = Sampler::default();
        let t0 = Instant::now();
        assert_eq!(s.qps(t0, 0, t0), 0.0);
        s.record(t0, reading(100), 0);
        assert!(s.series_json()["qps"].as_array().is_some_and(Vec::is_empty), "the first tick is a baseline");
        for i in 1..=20u64 {
            s.record(t0 + TICK * i as u32, reading(100 + 5 * i), i);
        }
        let v = s.series_json();
        assert_eq!(v["qps"].as_array().map(Vec::len), Some(20));
        assert_eq!(v["qps"][0], 5.0);
        let now = t0 + TICK * 20;
        let qps = s.qps(now, 200, t0);
        assert!((qps - 5.0).abs() < 1e-9, "10 s window: {qps}");
        let early = Sampler::default();
        early.record(t0, reading(0), 0);
        let qps = early.qps(t0 + Duration::from_millis(100), 10, t0 - Duration::from_secs(1));
        assert!((qps - 10.0 / 1.1).abs() < 1e-6, "no sample old enough: since start: {qps}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_ticks_once_a_second_until_stopped() {
        let s = Sampler::new();
        let stop = CancellationToken::new();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&n);
        s.start(move || Some(reading(counter.fetch_add(3, Ordering::Relaxed))), stop.clone());
        s.start(|| panic!("a second start must not spawn a second task"), stop.clone());
        tokio::time::sleep(TICK * 5 + Duration::from_millis(10)).await;
        let v = s.series_json();
        assert_eq!(v["qps"].as_array().map(Vec::len), Some(5), "{v}");
        assert!(v["qps"].as_array().into_iter().flatten().all(|q| q == 3.0), "{v}");
        stop.cancel();
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(s.series_json()["qps"].as_array().map(Vec::len), Some(5), "stopped");
    }
}
