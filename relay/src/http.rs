//! `/healthz`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

/// State behind the endpoints.
#[derive(Clone)]
pub struct Surfaces {
    /// Health flags.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The router (exposed for tests).
pub fn router(s: Surfaces) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(s)
}

async fn readyz(State(s): State<Surfaces>) -> impl IntoResponse {
    let r = s.health.readiness();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}

async fn metrics(State(s): State<Surfaces>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    s: Surfaces,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(s))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}
