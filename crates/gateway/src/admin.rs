//! The admin API under `/api`: status, workers, routing stats, config.

use crate::state::AppState;
use axum::Router;
use std::sync::Arc;

/// Admin routes, merged into the app by `server::app`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
