//! Prometheus metrics of a consumer.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a per-partition series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

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
    /// Time in the handler for one event.
    pub handler_seconds: Histogram,
    /// From the start of an event's handler to the commit of its transaction.
    pub handler_to_commit_seconds: Histogram,
    /// Events per transaction (a run of one partition).
    pub batch_size: Histogram,
    /// Records behind the committed offset, per assigned partition (from librdkafka statistics).
    pub lag: Family<TopicPartition, Gauge>,
    /// Partitions owned by this member.
    pub assigned_partitions: Gauge,
    /// Kafka clients replaced because the group membership stalled (see [`crate::membership`]).
    pub client_restarts: Counter,
    /// Fetches that skipped offsets (see [`crate::continuity`]).
    pub offset_gaps: Counter,
    /// Partitions stopped at an offset gap seen twice (see [`crate::continuity`]).
    pub partitions_stopped_at_gap: Gauge,
    lag_series: Mutex<HashSet<TopicPartition>>,
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
            handler_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            handler_to_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            lag: Family::default(),
            assigned_partitions: Gauge::default(),
            client_restarts: Counter::default(),
            offset_gaps: Counter::default(),
            partitions_stopped_at_gap: Gauge::default(),
            lag_series: Mutex::default(),
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
            "Time in the handler for one event",
            m.handler_seconds.clone(),
        );
        registry.register(
            "handler_to_commit_seconds",
            "From the start of an event's handler to the commit of its transaction",
            m.handler_to_commit_seconds.clone(),
        );
        registry.register(
            "batch_size",
            "Events per inbox transaction",
            m.batch_size.clone(),
        );
        registry.register(
            "lag",
            "Records behind the committed offset, per assigned partition",
            m.lag.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Partitions owned by this member",
            m.assigned_partitions.clone(),
        );
        registry.register(
            "client_restarts",
            "Kafka clients replaced because the group membership stalled while the broker answered",
            m.client_restarts.clone(),
        );
        registry.register(
            "offset_gaps",
            "Fetches that skipped offsets of a partition (fetched once more; the partition stops when seen again)",
            m.offset_gaps.clone(),
        );
        registry.register(
            "partitions_stopped_at_gap",
            "Partitions stopped at an offset gap that was there again when fetched once more (loss on a relay topic)",
            m.partitions_stopped_at_gap.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Renders the OpenMetrics text format.
    pub fn render(&self) -> String {
        process_kit::surfaces::render(&self.registry)
    }

    /// Replaces the lag series with `current`; partitions no longer owned disappear.
    pub fn set_lag(&self, current: impl IntoIterator<Item = (TopicPartition, i64)>) {
        let mut series = self.lag_series.lock().unwrap();
        let mut now = HashSet::new();
        for (tp, lag) in current {
            self.lag.get_or_create(&tp).set(lag);
            now.insert(tp);
        }
        for gone in series.difference(&now) {
            self.lag.remove(gone);
        }
        *series = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_series_follow_the_assignment() {
        let m = Metrics::default();
        let tp = |p| TopicPartition {
            topic: "orders".into(),
            partition: p,
        };
        m.set_lag([(tp(0), 5), (tp(1), 7)]);
        let text = m.render();
        assert!(
            text.contains(r#"outbox_consumer_lag{topic="orders",partition="1"} 7"#),
            "{text}"
        );
        m.set_lag([(tp(0), 2)]);
        let text = m.render();
        assert!(text.contains(r#"outbox_consumer_lag{topic="orders",partition="0"} 2"#));
        assert!(
            !text.contains(r#"partition="1""#),
            "revoked partition still exported:\n{text}"
        );
    }
}
