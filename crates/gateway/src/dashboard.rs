//! The live dashboard: `GET /` serves one embedded page; `/ws` pushes state to it.

use crate::state::AppState;
use axum::Router;
use std::sync::Arc;

/// Dashboard routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
