//! Prometheus metrics of the demo API (prefix `demo_api`).

use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::api::ApiError;

/// Label of rejected requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The rejection's `error` field.
    pub error: String,
}

/// Every metric.
pub struct Metrics {
    registry: Registry,
    /// Orders committed (with their event).
    pub orders_created: Counter,
    /// Generic messages committed.
    pub messages_published: Counter,
    /// Write requests answered with an error, by kind.
    pub rejected: Family<Kind, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("demo_api");
        let m = Self {
            registry: Registry::default(),
            orders_created: Counter::default(),
            messages_published: Counter::default(),
            rejected: Family::default(),
        };
        registry.register(
            "orders_created",
            "Orders committed with their event",
            m.orders_created.clone(),
        );
        registry.register(
            "messages_published",
            "Generic messages committed",
            m.messages_published.clone(),
        );
        registry.register(
            "rejected",
            "Write requests answered with an error",
            m.rejected.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// OpenMetrics text.
    pub fn render(&self) -> String {
        process_kit::surfaces::render(&self.registry)
    }

    /// Counts a rejected write.
    pub fn count(&self, r: &Result<Response, ApiError>) {
        if let Err(e) = r {
            self.rejected
                .get_or_create(&Kind {
                    error: e.kind().to_owned(),
                })
                .inc();
        }
    }
}
