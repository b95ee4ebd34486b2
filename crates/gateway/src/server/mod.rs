//! The HTTP surface (`app`) and the server's lifecycle (`Gateway::start`, graceful shutdown); the
//! connections themselves are accepted and bounded in [`crate::server::connections`].

pub mod budget;
pub mod connections;

use crate::config::Config;
use crate::error::ApiError;
use crate::periodic;
use crate::proxy;
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_core::{ErrorKind, GatewayError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The gateway's routes over `state`. Tests can call it without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    // Every inference endpoint goes through the one proxy path; it tells them apart by path.
    let inference =
        proxy::endpoint::ROUTES.iter().fold(Router::new(), |r, (path, _)| r.route(path, post(proxy::forward)));
    inference
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes())
        .merge(crate::admin::breakers::routes())
        .route("/api/queue", get(crate::admin::queue::endpoint))
        .merge(crate::dashboard::routes())
        .merge(crate::batch::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn models(
    State(app): State<Arc<AppState>>,
    headers: http::HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let snap = app.snapshot.load();
    snap.auth.authenticate(&headers)?;
    // Served models, then the aliases of those served (`[[models]] aliases`), each under its own name.
    let served = snap.fleet.healthy_models();
    let aliases = snap
        .config
        .models
        .iter()
        .filter(|m| served.contains(&m.name))
        .flat_map(|m| m.aliases.iter().map(move |a| (a.clone(), Some(m.name.as_str()))));
    let data: Vec<_> = served
        .iter()
        .map(|id| (id.clone(), None))
        .chain(aliases)
        .map(|(id, root)| {
            let mut entry = serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-gateway"});
            if let Some(root) = root {
                entry["root"] = serde_json::Value::from(root);
            }
            entry
        })
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    let snap = app.snapshot.load();
    let healthy = snap.fleet.healthy_count();
    let body = serde_json::json!({
        "status": if healthy > 0 { "ok" } else { "unavailable" },
        "healthy_workers": healthy,
        "total_workers": snap.fleet.workers.len(),
    });
    let status = if healthy > 0 { http::StatusCode::OK } else { http::StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    app.refresh_gauges();
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn not_found(uri: http::Uri) -> ApiError {
    ApiError(GatewayError::new(ErrorKind::NotFound, format!("no route for {}", gateway_core::echo(uri.path()))))
}

async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    let err = GatewayError::new(
        ErrorKind::InvalidJson,
        format!("method {} is not allowed on {}", gateway_core::echo(method.as_str()), gateway_core::echo(uri.path())),
    )
    .with_code("method_not_allowed");
    let mut resp = ApiError(err).into_response();
    *resp.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
    resp
}

/// A running gateway.
pub struct Gateway {
    /// Shared state (tests and the admin API read it).
    pub state: Arc<AppState>,
    addr: SocketAddr,
    server: JoinHandle<()>,
    /// The serving runtimes: they end when the gateway is dropped (and its accept loop has ended).
    _runtimes: Arc<crate::runtimes::Runtimes>,
}

impl Gateway {
    /// Binds `server.host:server.port`, probes the workers once, and serves in the background.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let listener = TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        Self::serve(listener, config).await
    }

    /// Serves on a listener the caller bound (tests bind `127.0.0.1:0` first: no port race).
    pub async fn serve(listener: TcpListener, config: Config) -> anyhow::Result<Gateway> {
        let addr = listener.local_addr()?;
        if let Some(warning) = crate::admin::exposure_warning(&config, addr) {
            tracing::warn!("{warning}");
        }
        let runtimes = crate::runtimes::Runtimes::start(config.server.threads)
            .map(Arc::new)
            .map_err(|e| anyhow::anyhow!("cannot start the serving threads: {e}"))?;
        let state = AppState::new(config)?;
        // `dns+http://` workers join the fleet before the first probe and the first request.
        crate::discovery::start(&state).await;
        state.start_probes().await;
        let router = app(Arc::clone(&state));
        let fleet = {
            let state = Arc::downgrade(&state);
            move || state.upgrade().map(|s| Arc::clone(&s.snapshot.load().fleet))
        };
        let policy = {
            let state = Arc::downgrade(&state);
            move || state.upgrade().map(|s| Arc::clone(&s.snapshot.load().policy))
        };
        let cluster =
            Arc::clone(&state.cluster).run(Arc::clone(&state.admission), state.shutdown.clone(), fleet.clone(), policy);
        tokio::spawn(cluster);
        // Fast enough that a worker not yet learned is on its ramp before a burst piles onto it.
        let share = fleet.clone();
        let sharing = periodic::every(Duration::from_millis(100), state.shutdown.clone(), move || {
            share().map(|f| f.share_capacities()).is_some()
        });
        tokio::spawn(sharing);
        let admission = Arc::clone(&state.admission);
        let sweeper = periodic::every(Duration::from_millis(500), state.shutdown.clone(), move || {
            fleet().map(|f| admission.sweep(&f)).is_some()
        });
        tokio::spawn(sweeper);
        tokio::spawn(crate::batch::runner::run(Arc::downgrade(&state)));
        // The dashboard's charts have history from the start, not from the first page view.
        crate::dashboard::ensure_sampler(&state);
        let stop = state.shutdown.clone();
        let server = tokio::spawn(crate::server::connections::serve(
            listener,
            router,
            Arc::clone(&state),
            stop,
            Arc::clone(&runtimes),
        ));
        tracing::info!(%addr, "llm-gateway listening");
        Ok(Gateway { state, addr, server, _runtimes: runtimes })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish within `grace`, then returns. `true` when
    /// everything finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.state.shutdown.cancel();
        match tokio::time::timeout(grace, self.server).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(?grace, "shutdown grace period over; dropping remaining connections");
                false
            }
        }
    }
}
