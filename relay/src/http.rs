//! `/healthz`, `/readyz`, `/metrics` of the relay (served by [`process_kit::surfaces`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use process_kit::surfaces::{self, Surface};
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

impl Surface for Surfaces {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let r = self.health.readiness();
        let body = serde_json::to_value(&r).expect("readiness serializes");
        (r.ready, body)
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// The router (exposed for tests).
pub fn router(s: Surfaces) -> Router {
    surfaces::router(Arc::new(s))
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    s: Surfaces,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    surfaces::serve(addr, Arc::new(s), shutdown).await
}
