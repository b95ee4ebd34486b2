//! The live dashboard: `GET /` serves one page embedded in the binary (HTML, CSS and JS from
//! `crates/gateway/assets/`, no external resource, works offline); `GET /ws` pushes a JSON snapshot of
//! the gateway's state to it once right after connect and then every second.
//!
//! # The snapshot ([`state_json`])
//! `{"status", "workers", "routing", "queue", "rate_limit", "series", "strategies", "auth"}`: the admin
//! API's own views ([`views::status_json`], [`views::worker_json`] with the worker's `"breaker"`
//! ([`breakers::state_json`]), [`views::routing_stats_json`], [`queue::queue_json`]), the rate-limit
//! rejections by limit, and the time series of the last five minutes ([`series`]).
//!
//! The gateway's one [`series::Sampler`] starts with the server ([`ensure_sampler`]), or with the first
//! page, socket or status read of a gateway built without one.
//!
//! A socket opened from another site's page is refused (403, [`crate::admin::cross_site`]). Each socket has its
//! own sender task; it ends when the client leaves, when a send stalls for
//! [`SEND_TIMEOUT`], or when the gateway shuts down.

pub mod series;

use crate::admin::{breakers, queue, views};
use crate::state::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The page (markup only; its style and script are served beside it).
const PAGE_HTML: &str = include_str!("../../assets/dashboard.html");
/// The page's style sheet.
const PAGE_CSS: &str = include_str!("../../assets/dashboard.css");
/// The page's script.
const PAGE_JS: &str = include_str!("../../assets/dashboard.js");

/// How often a socket sends a snapshot (the sampler's tick).
pub const TICK: Duration = series::TICK;
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
            let mut v = views::worker_json(w, snap.config.queue.default_worker_concurrency);
            if let Value::Object(m) = &mut v {
                m.insert("breaker".into(), breakers::state_json(w, enabled));
            }
            v
        })
        .collect();
    json!({
        "status": views::status_json(app),
        "workers": workers,
        "routing": views::routing_stats_json(app),
        "queue": queue::queue_json(app),
        "rate_limit": {"rejected": app.metrics.rate_limit_rejections()},
        "series": app.sampler.series_json(),
        "strategies": routing::Strategy::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "auth": {"admin_token_required": snap.config.admin.token.is_some()},
    })
}

/// Starts this gateway's [`series::Sampler`] unless it runs already. The server calls it at start, so
/// the charts have history before anyone looks; the page, the socket and `/api/status` call it too.
/// The task holds only a `Weak` to the gateway and ends when it shuts down.
pub fn ensure_sampler(app: &Arc<AppState>) {
    let weak = Arc::downgrade(app);
    app.sampler.start(move || weak.upgrade().map(|a| series::Readings::of(&a.metrics)), app.shutdown.clone());
}
