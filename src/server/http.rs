//! The HTTP port: operational endpoints for people and probes.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::reload::{PolicyStatus, Reloader};

#[derive(Clone)]
struct HttpState {
    reloader: Arc<Reloader>,
}

pub fn router(reloader: Arc<Reloader>) -> Router {
    Router::new()
        .route("/status", get(status))
        .with_state(HttpState { reloader })
}

/// The policy in force and the last reload error, as JSON.
async fn status(State(state): State<HttpState>) -> Json<PolicyStatus> {
    Json(state.reloader.status())
}

/// Serves the HTTP endpoints on `listener` until `shutdown`.
pub async fn serve_http(
    reloader: Arc<Reloader>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(reloader))
        .with_graceful_shutdown(shutdown)
        .await
}
