//! `/healthz`, `/readyz` and `/metrics` for every process of the product.
//!
//! Each process says what "ready" means and renders its own metrics; this module serves them the same
//! way everywhere, so probes, dashboards and scripts need to know one shape only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

/// Content type of the OpenMetrics text rendered by `prometheus-client`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a process exposes on its probe endpoints.
pub trait Surface: Send + Sync + 'static {
    /// Whether the process does its job now, and a JSON body saying why (or why not).
    fn readiness(&self) -> (bool, serde_json::Value);
    /// The metrics in OpenMetrics text format.
    fn metrics(&self) -> String;
}

/// Whether a process reaches its database and its broker: written by its loops, callbacks and monitors,
/// read by its readiness. Both start unknown (false). The relay's and the consumer's health build on it.
#[derive(Debug, Default)]
pub struct Reachability {
    database: AtomicBool,
    broker: AtomicBool,
}

impl Reachability {
    /// Records the database's state.
    pub fn set_database(&self, up: bool) {
        self.database.store(up, Ordering::Relaxed);
    }

    /// Records the broker's state.
    pub fn set_broker(&self, up: bool) {
        self.broker.store(up, Ordering::Relaxed);
    }

    /// The database was reachable when last tried.
    pub fn database(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }

    /// At least one broker connection was up when last seen.
    pub fn broker(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }
}

/// A router with `/healthz` (always 200 while the process serves), `/readyz` (200 or 503 with the
/// readiness body) and `/metrics`. Merge it into an application's router or serve it alone.
pub fn router(s: Arc<dyn Surface>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(s)
}

async fn readyz(State(s): State<Arc<dyn Surface>>) -> impl IntoResponse {
    let (ready, body) = s.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics(State(s): State<Arc<dyn Surface>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], s.metrics())
}

/// Binds `addr` and serves `app` until `shutdown`. Returns the bound address (port 0 picks a free one).
pub async fn serve_router(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
    Ok(bound)
}

/// Binds `addr` and serves the probe endpoints of `s` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    s: Arc<dyn Surface>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    serve_router(addr, router(s), shutdown).await
}

/// Renders a `prometheus-client` registry as OpenMetrics text.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
