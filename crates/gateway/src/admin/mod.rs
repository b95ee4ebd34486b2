//! The admin API under `/api`: what operators use to see and steer a running gateway without a restart.
//!
//! Reads (`GET`) are open and never show a secret ([`config::redact`]); mutations (`POST`, `PATCH`,
//! `DELETE`) must come from the gateway's own page or a tool, never another site's page
//! ([`cross_site`]), need the admin token when `admin.token` is set, and must be
//! `Content-Type: application/json` ([`check_mutation`], through the [`AdminAuth`] extractor). Every
//! change of config or fleet goes through [`crate::reload`], so it is validated, swapped in one store
//! and never drops an in-flight request.
//!
//! | route | does | file |
//! |---|---|---|
//! | `GET /api/status` | version, uptime, strategy, worker and request counts, qps | [`views`] |
//! | `GET /api/workers`, `GET /api/workers/{id}` | list workers, one worker ([`views::worker_json`]) | [`views`] |
//! | `POST /api/workers` | add a worker (a `WorkerConfig`) | [`workers`] |
//! | `DELETE /api/workers/{id}` | remove a worker (its in-flight requests finish) | [`workers`] |
//! | `POST /api/workers/{id}/drain`, `/undrain` | stop / resume sending it new requests | [`workers`] |
//! | `GET /api/routing/stats` | routing decisions per strategy and worker | [`views`] |
//! | `GET /api/config`, `PATCH /api/config` | the running config (redacted); change it by JSON merge patch | [`config`] |
//! | `GET /api/circuit-breaker/stats`, `POST .../{id}/reset` | breakers | [`breakers`] |

pub mod breakers;
pub mod config;
pub mod cross_site;
pub mod queue;
pub mod views;
pub mod workers;

use crate::config::Config;
use crate::error::ApiError;
use crate::fleet::worker::Worker;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use gateway_core::{echo, ErrorKind, GatewayError};
use serde_json::Value;
use std::sync::Arc;

/// Admin routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/status", get(views::status))
        .route("/api/workers", get(views::list_workers).post(workers::add))
        .route("/api/workers/{id}", get(views::one_worker).delete(workers::remove))
        .route("/api/workers/{id}/drain", post(workers::drain))
        .route("/api/workers/{id}/undrain", post(workers::undrain))
        .route("/api/routing/stats", get(views::routing_stats))
        .route("/api/config", get(config::get).patch(config::patch))
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
// Helpers of the handlers

/// The worker named or numbered `id` in force, or a 404.
fn find(app: &AppState, id: &str) -> Result<Arc<Worker>, ApiError> {
    app.snapshot.load().fleet.find(id).cloned().ok_or_else(|| {
        ApiError(GatewayError::new(ErrorKind::NotFound, format!("no worker named or numbered {:?}", echo(id))))
    })
}

/// A 400 for a change the gateway refused (bad worker, bad config), with the reason.
fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(GatewayError::new(ErrorKind::InvalidJson, message).with_code("invalid_config"))
}

/// The body as JSON, or a 400 saying why not.
fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(GatewayError::new(ErrorKind::InvalidJson, format!("body is not valid JSON: {}", echo(&e.to_string()))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn token_comparison() {
        assert!(token_eq(b"abc", b"abc"));
        assert!(!token_eq(b"abd", b"abc"));
        assert!(!token_eq(b"ab", b"abc"));
        assert!(!token_eq(b"", b"abc"));
    }
}
