//! The admin API under `/api`: what operators use to see and steer a running gateway without a restart.
//!
//! Reads (`GET`) are open and never show a secret ([`redact`]); mutations (`POST`, `PATCH`, `DELETE`)
//! must come from the gateway's own page or a tool, never another site's page ([`crate::admin::cross_site`]),
//! need the admin token when `admin.token` is set, and must be `Content-Type: application/json`
//! ([`check_mutation`], through [`AdminAuth`] or [`require_admin`]). Every change of
//! config or fleet goes through [`crate::reload`], so it is validated, swapped in one store and never
//! drops an in-flight request.
//!
//! | route | does |
//! |---|---|
//! | `GET /api/status` | version, uptime, strategy, worker and request counts, qps |
//! | `GET /api/workers`, `POST /api/workers` | list workers ([`worker_json`]); add one (a `WorkerConfig`) |
//! | `DELETE /api/workers/{id}` | remove a worker (its in-flight requests finish) |
//! | `POST /api/workers/{id}/drain`, `/undrain` | stop / resume sending it new requests |
//! | `GET /api/routing/stats` | routing decisions per strategy and worker |
//! | `GET /api/config`, `PATCH /api/config` | the running config (redacted); change it by JSON merge patch |

pub mod breakers;
pub mod cross_site;
pub mod queue;

use crate::config::{Config, WorkerConfig};
use crate::error::ApiError;
use crate::fleet::worker::Worker;
use crate::reload;
use crate::state::AppState;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use gateway_core::{echo, ErrorKind, GatewayError};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Admin routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/workers", get(list_workers).post(add_worker))
        .route("/api/workers/{id}", get(one_worker).delete(remove_worker))
        .route("/api/workers/{id}/drain", post(drain))
        .route("/api/workers/{id}/undrain", post(undrain))
        .route("/api/routing/stats", get(routing_stats))
        .route("/api/config", get(get_config).patch(patch_config))
}

// ---------------------------------------------------------------------------------------------------
// Authentication

/// Header carrying the admin token as an alternative to `Authorization: Bearer`.
pub const ADMIN_TOKEN_HEADER: &str = "x-admin-token";

/// Checks the admin token of a mutation: `Ok` when no `admin.token` is configured, when the method only
/// reads (`GET`, `HEAD`, `OPTIONS`), or when `Authorization: Bearer <token>` or `X-Admin-Token: <token>`
/// matches in constant time. The token is never logged.
pub fn check_admin(app: &AppState, method: &http::Method, headers: &http::HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS) {
        return Ok(());
    }
    let snap = app.snapshot.load();
    let Some(expected) = snap.config.admin.token.as_deref() else { return Ok(()) };
    let bearer = crate::auth::bearer_token(headers);
    let header = headers.get(ADMIN_TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::trim);
    let ok = [bearer, header].into_iter().flatten().any(|given| token_eq(given.as_bytes(), expected.as_bytes()));
    if ok {
        Ok(())
    } else {
        let why = if bearer.is_none() && header.is_none() { "missing" } else { "wrong" };
        tracing::warn!(method = %method, "admin request refused: {why} admin token");
        Err(ApiError(GatewayError::new(
            ErrorKind::Unauthorized,
            format!("{why} admin token: send `Authorization: Bearer <admin.token>` or `X-Admin-Token`"),
        )))
    }
}

/// Constant-time comparison; a length mismatch is answered without looking at the bytes (the length of
/// the token is not the secret).
fn token_eq(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

/// Every check an admin mutation passes, in this order: not from another site's page (403,
/// [`crate::admin::cross_site::check_origin`]), the admin token ([`check_admin`], 401), a JSON content type
/// (400, [`crate::admin::cross_site::require_json`]). Reads (`GET`, `HEAD`, `OPTIONS`) pass.
pub fn check_mutation(
    app: &AppState,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(), ApiError> {
    if matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS) {
        return Ok(());
    }
    crate::admin::cross_site::check_origin(uri, headers).map_err(|e| {
        tracing::warn!(method = %method, path = %echo(uri.path()), "admin request refused: {}", e.message);
        ApiError(e)
    })?;
    check_admin(app, method, headers)?;
    crate::admin::cross_site::require_json(headers)?;
    Ok(())
}

/// The warning logged at start when the admin API is open to the network: no `admin.token` and a
/// listening address other than loopback.
pub fn exposure_warning(config: &Config, addr: std::net::SocketAddr) -> Option<String> {
    if config.admin.token.is_some() || addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "ADMIN API OPEN TO THE NETWORK: listening on {addr} without admin.token, so anyone who can reach this \
         port can add, remove and drain workers and change the config; set admin.token (LLM_ADMIN_TOKEN), and \
         admin.require_token = true to make this an error"
    ))
}

/// Middleware form of [`check_mutation`], for routers built with the state at hand:
/// `router.route_layer(axum::middleware::from_fn_with_state(state, require_admin))`.
pub async fn require_admin(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match check_mutation(&app, req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Extractor form of [`check_mutation`]: a handler that takes it runs only for an authorised caller.
/// (`routes()` has no state value to build a middleware layer from, so its mutations use this.)
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

impl FromRequestParts<Arc<AppState>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, app: &Arc<AppState>) -> Result<Self, ApiError> {
        check_mutation(app, &parts.method, &parts.uri, &parts.headers).map(|()| AdminAuth)
    }
}

// ---------------------------------------------------------------------------------------------------
// Status

async fn status(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(status_json(&app))
}

/// The body of `GET /api/status`.
pub fn status_json(app: &Arc<AppState>) -> Value {
    let snap = app.snapshot.load();
    let workers = &snap.fleet.workers;
    let draining = workers.iter().filter(|w| w.stats.draining.load(Ordering::Relaxed)).count();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": app.started.elapsed().as_secs(),
        "strategy": snap.policy.name(),
        "workers": {"total": workers.len(), "healthy": snap.fleet.healthy_count(), "draining": draining},
        "requests": {"total": requests_total(app), "active": app.metrics.active_requests.get()},
        "qps": round2(qps(app)),
    })
}

/// Requests answered so far: the sum of the `llm_gateway_requests_total` family.
pub fn requests_total(app: &AppState) -> u64 {
    use prometheus::core::Collector;
    app.metrics
        .requests
        .collect()
        .iter()
        .flat_map(|mf| mf.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Samples of `(when, requests_total)` of one gateway, one a second over the last [`QPS_WINDOW`].
struct Sampler {
    samples: parking_lot::Mutex<VecDeque<(Instant, u64)>>,
}

/// The window `qps` is measured over.
pub const QPS_WINDOW: Duration = Duration::from_secs(10);

/// One sampler per running gateway (several run in one test process), dropped with it.
static SAMPLERS: parking_lot::Mutex<Vec<(Weak<AppState>, Arc<Sampler>)>> = parking_lot::const_mutex(Vec::new());

/// Requests per second over the last ~10 s. The first call starts a sampler task for this gateway (it
/// ends with the gateway); until it has samples, the average since start is answered.
pub fn qps(app: &Arc<AppState>) -> f64 {
    let sampler = sampler(app);
    let now = Instant::now();
    let total = requests_total(app);
    let samples = sampler.samples.lock();
    let (t0, n0) = match samples.front() {
        Some(&(t, n)) if now.duration_since(t) >= Duration::from_millis(500) => (t, n),
        _ => (app.started, 0),
    };
    let secs = now.duration_since(t0).as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        total.saturating_sub(n0) as f64 / secs
    }
}

fn sampler(app: &Arc<AppState>) -> Arc<Sampler> {
    let mut all = SAMPLERS.lock();
    all.retain(|(w, _)| w.strong_count() > 0);
    if let Some((_, s)) = all.iter().find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(app))) {
        return Arc::clone(s);
    }
    let sampler = Arc::new(Sampler { samples: parking_lot::Mutex::new(VecDeque::new()) });
    all.push((Arc::downgrade(app), Arc::clone(&sampler)));
    let weak = Arc::downgrade(app);
    let stop = app.shutdown.clone();
    let s = Arc::clone(&sampler);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(app) = weak.upgrade() else { return };
            let total = requests_total(&app);
            drop(app);
            let mut samples = s.samples.lock();
            samples.push_back((Instant::now(), total));
            while samples.len() > QPS_WINDOW.as_secs() as usize + 1 {
                samples.pop_front();
            }
        }
    });
    sampler
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------------
// Workers

/// One worker as the admin API, the CLI and the dashboard show it.
pub fn worker_json(w: &Worker) -> Value {
    let s = &w.stats;
    json!({
        "id": w.id,
        "name": w.name,
        "url": w.spec.display_url(),
        "weight": w.spec.weight,
        "models": w.models.load().as_slice(),
        "max_concurrency": w.spec.max_concurrency,
        "healthy": s.healthy.load(Ordering::Relaxed),
        "draining": s.draining.load(Ordering::Relaxed),
        "in_flight": s.slots.in_flight(),
        "running": s.scraped_running.load(Ordering::Relaxed),
        "waiting": s.scraped_waiting.load(Ordering::Relaxed),
        "kv_usage": s.kv_usage.get(),
        "ttft_ms": round2(s.ttft_ms.get()),
        "tpot_ms": round2(s.tpot_ms.get()),
        "error_rate": s.error_rate.get(),
        "requests_total": s.requests_total.load(Ordering::Relaxed),
        "probe_path": w.probe_path.load().describe(),
        "metrics_dialect": w.dialect().as_str(),
    })
}

async fn list_workers(State(app): State<Arc<AppState>>) -> Json<Value> {
    let snap = app.snapshot.load();
    Json(Value::Array(snap.fleet.workers.iter().map(|w| worker_json(w)).collect()))
}

fn find(app: &AppState, id: &str) -> Result<Arc<Worker>, ApiError> {
    app.snapshot.load().fleet.find(id).cloned().ok_or_else(|| {
        ApiError(GatewayError::new(ErrorKind::NotFound, format!("no worker named or numbered {:?}", echo(id))))
    })
}

async fn one_worker(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(worker_json(&*find(&app, &id)?)))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(GatewayError::new(ErrorKind::InvalidJson, message).with_code("invalid_config"))
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(GatewayError::new(ErrorKind::InvalidJson, format!("body is not valid JSON: {}", echo(&e.to_string()))))
    })
}

async fn add_worker(_: AdminAuth, State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let spec: WorkerConfig = serde_json::from_value(parse_json(&body)?)
        .map_err(|e| bad_request(format!("worker: {} (a worker needs at least \"url\")", echo(&e.to_string()))))?;
    let name = spec.display_name();
    let added = spec.clone();
    reload::update(&app, move |cur| {
        let mut next = cur.clone();
        next.workers.push(added);
        Ok(next)
    })
    .await
    .map_err(bad_request)?;
    let w = find(&app, &name)?;
    tracing::info!(worker = %w.name, url = %w.spec.display_url(), "worker added through the admin API");
    Ok((http::StatusCode::CREATED, Json(worker_json(&w))).into_response())
}

async fn remove_worker(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let w = find(&app, &id)?;
    let spec = w.spec.clone();
    reload::update(&app, move |cur| {
        let mut next = cur.clone();
        next.workers.retain(|s| *s != spec);
        Ok(next)
    })
    .await
    .map_err(bad_request)?;
    tracing::info!(worker = %w.name, url = %w.spec.display_url(), "worker removed through the admin API");
    Ok(Json(worker_json(&w)))
}

async fn drain(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&app, &id, true)
}

async fn undrain(
    _: AdminAuth,
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&app, &id, false)
}

fn set_draining(app: &AppState, id: &str, on: bool) -> Result<Json<Value>, ApiError> {
    let w = find(app, id)?;
    let was = w.stats.draining.swap(on, Ordering::Relaxed);
    if was != on {
        let in_flight = w.stats.slots.in_flight();
        if on {
            tracing::info!(worker = %w.name, in_flight, "worker draining: no new requests");
        } else {
            tracing::info!(worker = %w.name, "worker undrained: takes new requests again");
        }
    }
    Ok(Json(worker_json(&w)))
}

// ---------------------------------------------------------------------------------------------------
// Routing stats

async fn routing_stats(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(routing_stats_json(&app))
}

/// The body of `GET /api/routing/stats`: decisions per strategy and worker (from
/// `llm_gateway_routing_decisions_total`) and each worker's share under the strategy in force.
pub fn routing_stats_json(app: &AppState) -> Value {
    let snap = app.snapshot.load();
    let current = snap.policy.name();
    let mut decisions: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for mf in app.metrics.registry().gather() {
        if mf.name() != "llm_gateway_routing_decisions_total" {
            continue;
        }
        for m in mf.get_metric() {
            let label = |k: &str| m.get_label().iter().find(|l| l.name() == k).map(|l| l.value().to_string());
            let (Some(strategy), Some(worker)) = (label("strategy"), label("worker")) else { continue };
            *decisions.entry(strategy).or_default().entry(worker).or_default() += m.get_counter().get_value() as u64;
        }
    }
    let mine = decisions.get(current).cloned().unwrap_or_default();
    let total: u64 = mine.values().sum();
    let mut names: Vec<String> = snap.fleet.workers.iter().map(|w| w.name.clone()).collect();
    names.extend(mine.keys().filter(|k| !snap.fleet.workers.iter().any(|w| &w.name == *k)).cloned());
    let workers: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let n = mine.get(&name).copied().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { n as f64 / total as f64 };
            json!({"name": name, "decisions": n, "share": (share * 1000.0).round() / 1000.0})
        })
        .collect();
    json!({"strategy": current, "decisions": decisions, "workers": workers})
}

// ---------------------------------------------------------------------------------------------------
// Config

/// Keys whose string values are secrets, wherever they appear in the config tree.
const SECRET_KEYS: &[&str] = &["api_key", "token", "key", "password", "secret"];

pub use crate::config::REDACTED;

/// Replaces secrets in a config tree, by key name so sections added later are covered: string values of
/// keys named `api_key`, `token`, `key`, `password`, `secret` (or ending in `_key`, `_token`,
/// `_password`, `_secret`) become `"***"`, and so do the credentials of any URL (`redis://u:pw@h`,
/// [`crate::config::redact_url`]).
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let k = k.strip_suffix('s').unwrap_or(&k);
                let secret = SECRET_KEYS.iter().any(|s| k == *s || k.ends_with(&format!("_{s}")));
                match v {
                    Value::String(s) if secret => *s = REDACTED.into(),
                    Value::Array(items) if secret => {
                        for item in items.iter_mut() {
                            if item.is_string() {
                                *item = Value::String(REDACTED.into());
                            } else {
                                redact(item);
                            }
                        }
                    }
                    _ => redact(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = crate::config::redact_url(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// The running config as JSON, secrets redacted.
pub fn redacted_config(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    redact(&mut v);
    v
}

async fn get_config(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(redacted_config(&app.snapshot.load().config))
}

/// Applies an RFC 7386 JSON merge patch to `target`: objects merge key by key, `null` deletes, anything
/// else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `current` with `patch` merged in, read back as a [`Config`] and validated. The error names the key.
pub fn patched_config(current: &Config, patch: &Value) -> Result<Config, String> {
    if !patch.is_object() {
        return Err("the body must be a JSON object (a merge patch of the config)".into());
    }
    let mut doc = serde_json::to_value(current).map_err(|e| format!("cannot serialise the config: {e}"))?;
    merge_patch(&mut doc, patch);
    let config: Config = figment::Figment::from(figment::providers::Serialized::defaults(doc))
        .extract()
        .map_err(|e| figment_one_line(&e))?;
    config.validate()?;
    Ok(config)
}

/// A figment error as one line naming the key: `routing.strategy: unknown variant ...`.
fn figment_one_line(e: &figment::Error) -> String {
    let first = e.clone().into_iter().next().unwrap_or_else(|| e.clone());
    let key = if first.path.is_empty() { String::new() } else { format!("{}: ", first.path.join(".")) };
    format!("{key}{}", first.kind).replace('\n', " ")
}

async fn patch_config(_: AdminAuth, State(app): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let patch = parse_json(&body)?;
    let config = reload::update(&app, |cur| patched_config(cur, &patch)).await.map_err(bad_request)?;
    tracing::info!("config patched through the admin API");
    Ok(Json(redacted_config(&config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_is_by_key_name_and_url_password() {
        let mut v = json!({
            "workers": [{"url": "http://a:1", "api_key": "sk-1"}, {"url": "http://b:1", "api_key": null}],
            "admin": {"token": "t0p"},
            "cache": {"redis_url": "redis://user:pw@host:6379/0", "signing_key": "k", "keys": ["x"]},
            "auth": {"keys": [{"key": "sk-2", "tenant": "a"}]},
        });
        redact(&mut v);
        assert_eq!(v["workers"][0]["api_key"], REDACTED);
        assert_eq!(v["workers"][0]["url"], "http://a:1");
        assert_eq!(v["workers"][1]["api_key"], Value::Null);
        assert_eq!(v["admin"]["token"], REDACTED);
        assert_eq!(v["cache"]["redis_url"], "redis://user:***@host:6379/0");
        assert_eq!(v["cache"]["signing_key"], REDACTED);
        assert_eq!(v["auth"]["keys"][0]["key"], REDACTED);
        assert_eq!(v["auth"]["keys"][0]["tenant"], "a");
        assert_eq!(v["cache"]["keys"][0], REDACTED);
        assert!(!v.to_string().contains("sk-") && !v.to_string().contains("t0p") && !v.to_string().contains(":pw@"));
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn patch_errors_name_the_key() {
        let cur = Config::default();
        let e = patched_config(&cur, &json!({"routing": {"strategy": "nope"}})).unwrap_err();
        assert!(e.starts_with("routing.strategy") && e.contains("nope"), "{e}");
        let e = patched_config(&cur, &json!({"routing": {"bogus": 1}})).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = patched_config(&cur, &json!({"health": {"interval_ms": 0}})).unwrap_err();
        assert!(e.contains("health.interval_ms"), "{e}");
        let ok = patched_config(&cur, &json!({"routing": {"strategy": "least_queue"}})).unwrap();
        assert_eq!(ok.routing.strategy, routing::Strategy::LeastQueue);
        assert_eq!(ok.server, cur.server);
    }

    #[test]
    fn an_open_admin_api_on_the_network_is_warned_about() {
        let mut c = Config::default();
        let public: std::net::SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let lan: std::net::SocketAddr = "10.1.2.3:9000".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let v6_loopback: std::net::SocketAddr = "[::1]:9000".parse().unwrap();
        let w = exposure_warning(&c, public).expect("a warning on 0.0.0.0");
        assert!(w.contains("0.0.0.0:9000") && w.contains("admin.token") && w.contains("require_token"), "{w}");
        assert!(!w.contains('\n'));
        assert!(exposure_warning(&c, lan).is_some());
        assert!(exposure_warning(&c, loopback).is_none());
        assert!(exposure_warning(&c, v6_loopback).is_none());
        c.admin.token = Some("t".into());
        assert!(exposure_warning(&c, public).is_none());
    }

    #[test]
    fn redaction_covers_user_only_urls() {
        let mut v = json!({"workers": [{"url": "http://tok3n@h:1/"}], "list": ["http://u:pw@h"]});
        redact(&mut v);
        assert_eq!(v["workers"][0]["url"], "http://***@h:1/");
        assert_eq!(v["list"][0], "http://u:***@h");
    }

    #[test]
    fn token_comparison() {
        assert!(token_eq(b"abc", b"abc"));
        assert!(!token_eq(b"abd", b"abc"));
        assert!(!token_eq(b"ab", b"abc"));
        assert!(!token_eq(b"", b"abc"));
    }
}
