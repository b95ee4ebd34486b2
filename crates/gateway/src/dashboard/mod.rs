//! The live dashboard: `GET /` serves one page embedded in the binary (HTML, CSS and JS from
//! `crates/gateway/assets/`, no external resource, works offline); `GET /ws` pushes a JSON snapshot of
//! the gateway's state to it once right after connect and then every second.
//!
//! # The snapshot ([`state_json`])
//! `{"status", "workers", "routing", "queue", "rate_limit", "series", "strategies", "auth"}`: the admin
//! API's own views ([`admin::status_json`], [`admin::worker_json`] with the worker's `"breaker"`
//! snapshot, [`admin::routing_stats_json`], [`crate::admin::queue::queue_json`]), the rate-limit rejections by
//! limit, and the time series of the last five minutes.
//!
//! # The time series ([`Series`])
//! One background sampler per gateway ticks every second and turns metric *deltas* into points: qps from
//! `llm_gateway_requests_total`, latency and TTFT quantiles from the bucket deltas of their histograms
//! (linear interpolation inside the bucket that holds the quantile, as Prometheus' `histogram_quantile`
//! does). A second without observations has no quantile (`null`: a gap in the chart, not a zero). Every
//! buffer holds at most [`SERIES_LEN`] points. The sampler starts with the first page or socket of a
//! gateway ([`ensure_sampler`]), holds only a `Weak` to it, and ends when it shuts down.
//!
//! A socket opened from another site's page is refused (403, [`crate::admin::cross_site`]). Each socket has its
//! own sender task; it ends when the client leaves, when a send stalls for
//! [`SEND_TIMEOUT`], or when the gateway shuts down.

use crate::admin;
use crate::admin::breakers;
use crate::state::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The page (markup only; its style and script are served beside it).
const PAGE_HTML: &str = include_str!("../../assets/dashboard.html");
/// The page's style sheet.
const PAGE_CSS: &str = include_str!("../../assets/dashboard.css");
/// The page's script.
const PAGE_JS: &str = include_str!("../../assets/dashboard.js");

/// Points kept per series: five minutes at one point a second.
pub const SERIES_LEN: usize = 300;
/// How often the sampler takes a point and a socket sends a snapshot.
pub const TICK: Duration = Duration::from_secs(1);
/// A socket whose client does not take a snapshot within this time is closed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Dashboard routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(page))
        .route("/dashboard/app.css", get(css))
        .route("/dashboard/app.js", get(js))
        .route("/ws", get(ws))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(http::header::CONTENT_TYPE, content_type), (http::header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn page(State(app): State<Arc<AppState>>) -> Response {
    ensure_sampler(&app);
    asset("text/html; charset=utf-8", PAGE_HTML)
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

// ---------------------------------------------------------------------------------------------------
// WebSocket

/// The socket is refused (403) to another site's page: a WebSocket is not bound by CORS, and the snapshot
/// is the admin view of the fleet.
async fn ws(
    State(app): State<Arc<AppState>>,
    uri: http::Uri,
    headers: http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(e) = crate::admin::cross_site::check_origin(&uri, &headers) {
        tracing::warn!("dashboard socket refused: {}", e.message);
        return crate::error::ApiError(e).into_response();
    }
    ensure_sampler(&app);
    upgrade.on_upgrade(move |socket| push(app, socket))
}

/// Sends a snapshot at once and then every [`TICK`] until the client leaves or the gateway stops.
async fn push(app: Arc<AppState>, mut socket: WebSocket) {
    let stop = app.shutdown.clone();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
                return;
            }
            _ = tick.tick() => {
                let text = state_json(&app).to_string();
                match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The snapshot

/// The state the page shows, as `/ws` sends it (see the module docs for the keys).
pub fn state_json(app: &Arc<AppState>) -> Value {
    let snap = app.snapshot.load();
    let enabled = snap.config.circuit_breaker.enabled;
    let workers: Vec<Value> = snap
        .fleet
        .workers
        .iter()
        .map(|w| {
            let mut v = admin::worker_json(w);
            let mut breaker = breakers::breaker_json(w, enabled).get("breaker").cloned().unwrap_or(Value::Null);
            if let Value::Object(b) = &mut breaker {
                b.insert("enabled".into(), Value::Bool(enabled));
            }
            if let Value::Object(m) = &mut v {
                m.insert("breaker".into(), breaker);
            }
            v
        })
        .collect();
    let series = sampler_of(app).map(|s| s.series.lock().to_json()).unwrap_or_else(|| Series::default().to_json());
    json!({
        "status": admin::status_json(app),
        "workers": workers,
        "routing": admin::routing_stats_json(app),
        "queue": crate::admin::queue::queue_json(app),
        "rate_limit": {"rejected": rate_limit_rejections(app)},
        "series": series,
        "strategies": routing::Strategy::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "auth": {"admin_token_required": snap.config.admin.token.is_some()},
    })
}

/// `{limit: rejected}` from the `llm_rate_limiter_rejected_total{limit}` family (empty until a limit
/// rejects something).
fn rate_limit_rejections(app: &AppState) -> Map<String, Value> {
    let mut by_limit: BTreeMap<String, u64> = BTreeMap::new();
    for mf in app.metrics.registry().gather() {
        if mf.name() != "llm_rate_limiter_rejected_total" {
            continue;
        }
        for m in mf.get_metric() {
            let limit = m.get_label().iter().find(|l| l.name() == "limit").map_or("unknown", |l| l.value());
            *by_limit.entry(limit.to_string()).or_default() += m.get_counter().get_value() as u64;
        }
    }
    by_limit.into_iter().map(|(k, n)| (k, json!(n))).collect()
}

// ---------------------------------------------------------------------------------------------------
// Time series

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

/// The sampler of one gateway: the series it fills (its previous readings live in its task).
struct Sampler {
    series: parking_lot::Mutex<Series>,
}

/// One sampler per running gateway (several run in one test process); entries of dropped gateways are
/// pruned whenever one is looked up.
static SAMPLERS: parking_lot::Mutex<Vec<(Weak<AppState>, Arc<Sampler>)>> = parking_lot::const_mutex(Vec::new());

fn sampler_of(app: &Arc<AppState>) -> Option<Arc<Sampler>> {
    let all = SAMPLERS.lock();
    all.iter().find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(app))).map(|(_, s)| Arc::clone(s))
}

/// Starts this gateway's series sampler unless it runs already. Called by the page and the socket;
/// the server may call it at start so the charts have history before anyone looks.
pub fn ensure_sampler(app: &Arc<AppState>) {
    let sampler = {
        let mut all = SAMPLERS.lock();
        all.retain(|(w, _)| w.strong_count() > 0);
        if all.iter().any(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(app))) {
            return;
        }
        let sampler = Arc::new(Sampler { series: parking_lot::Mutex::new(Series::default()) });
        all.push((Arc::downgrade(app), Arc::clone(&sampler)));
        sampler
    };
    if app.shutdown.is_cancelled() {
        return;
    }
    tokio::spawn(run_sampler(Arc::downgrade(app), app.shutdown.clone(), sampler));
}

/// Reads the counters a point is made of.
fn readings(app: &AppState) -> (u64, Buckets, Buckets) {
    (admin::requests_total(app), Buckets::read(&app.metrics.latency), Buckets::read(&app.metrics.ttft))
}

async fn run_sampler(app: Weak<AppState>, stop: tokio_util::sync::CancellationToken, sampler: Arc<Sampler>) {
    let Some(first) = app.upgrade().map(|a| readings(&a)) else { return };
    let (mut requests, mut latency, mut ttft) = first;
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(last + TICK, TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some((n, lat, tt)) = app.upgrade().map(|a| readings(&a)) else { return };
        let now = tokio::time::Instant::now();
        let secs = now.duration_since(last).as_secs_f64().max(1e-3);
        let d_lat = lat.since(&latency);
        let d_tt = tt.since(&ttft);
        let ms = |b: &Buckets, q: f64| b.quantile(q).map(|s| s * 1000.0);
        let point = Point {
            t: unix_ms(),
            qps: n.saturating_sub(requests) as f64 / secs,
            latency_p50_ms: ms(&d_lat, 0.5),
            latency_p99_ms: ms(&d_lat, 0.99),
            ttft_p50_ms: ms(&d_tt, 0.5),
            ttft_p99_ms: ms(&d_tt, 0.99),
        };
        sampler.series.lock().push(point);
        (requests, latency, ttft, last) = (n, lat, tt, now);
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
}
