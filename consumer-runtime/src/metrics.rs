//! Prometheus metrics of a consumer.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric the runtime exports (prefix `outbox_consumer`).
pub struct Metrics {
    /// The registry.
    pub registry: Registry,
    /// Events whose handler committed.
    pub processed: Counter,
    /// Deliveries skipped because the inbox already had the event.
    pub duplicates: Counter,
    /// Handler retries scheduled.
    pub retries: Counter,
    /// Records sent to a DLQ topic.
    pub dead_lettered: Counter,
    /// Attempts that failed on the database (retried, never dead-lettered).
    pub database_errors: Counter,
    /// Handler time, inbox insert to commit.
    pub handler_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("outbox_consumer");
        let m = Self {
            registry: Registry::default(),
            processed: Counter::default(),
            duplicates: Counter::default(),
            retries: Counter::default(),
            dead_lettered: Counter::default(),
            database_errors: Counter::default(),
            handler_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        registry.register(
            "processed",
            "Events whose handler committed",
            m.processed.clone(),
        );
        registry.register(
            "duplicates_skipped",
            "Deliveries skipped by the inbox",
            m.duplicates.clone(),
        );
        registry.register("retries", "Handler retries scheduled", m.retries.clone());
        registry.register(
            "dead_lettered",
            "Records sent to a DLQ topic",
            m.dead_lettered.clone(),
        );
        registry.register(
            "database_errors",
            "Attempts that failed on the database",
            m.database_errors.clone(),
        );
        registry.register(
            "handler_seconds",
            "Handler time including the commit",
            m.handler_seconds.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
