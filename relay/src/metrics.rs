//! Prometheus metrics of the relay.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::Backlog;

/// Label for counts broken down by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Short machine-readable reason.
    pub reason: String,
}

impl Reason {
    /// Label value `reason`.
    pub fn of(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Every metric the relay exports.
pub struct Metrics {
    /// The registry rendered on `/metrics`.
    pub registry: Registry,
    /// Pending events in `outbox.events`.
    pub pending: Gauge,
    /// Age of the oldest pending event.
    pub oldest_pending_age_seconds: Gauge<f64, AtomicU64>,
    /// Pending events that failed at least once (backoff or due again).
    pub retrying: Gauge,
    /// Rows in `outbox.dead`.
    pub dead_rows: Gauge,
    /// Events acknowledged by Kafka.
    pub published: Counter,
    /// Failed deliveries by reason.
    pub failures: Family<Reason, Counter>,
    /// Retries scheduled (attempts+1 with backoff).
    pub retries: Counter,
    /// Events moved to `outbox.dead`, by reason.
    pub dead: Family<Reason, Counter>,
    /// Events published to a DLQ topic.
    pub dlq_published: Counter,
    /// Events per claimed batch.
    pub batch_size: Histogram,
    /// Time from `created_at` to the delivery report.
    pub commit_to_ack_seconds: Histogram,
    /// Batches that failed as a whole (database or fencing), by reason.
    pub batch_errors: Family<Reason, Counter>,
    /// Batches claimed and sent whose settle is still to come.
    pub in_flight_batches: Gauge,
    /// Events acknowledged after an earlier event of their key failed (in the same or an earlier batch in flight).
    pub order_violations: Counter,
    /// 1 while this relay holds the right to publish.
    pub active: Gauge,
    /// 1 while this relay holds the Kubernetes Lease (lease mode).
    pub is_leader: Gauge,
    /// `leaseTransitions` of the Lease when this relay last acquired it (its fencing epoch).
    pub lease_transitions: Gauge,
    /// Duration of Lease writes (acquire and renew), by result.
    pub lease_write_seconds: Family<Reason, Histogram>,
    /// 1 while the database answers.
    pub database_up: Gauge,
    /// 1 while the broker answers.
    pub broker_up: Gauge,
    /// Times the loop stopped claiming because deliveries failed through the broker's fault.
    pub broker_waits: Counter,
    /// 1 while the loop does not claim, waiting for the broker to answer again.
    pub claiming_paused: Gauge,
    /// Copies to `<topic>.dlq` that failed (the dead row keeps them due; they are sent again).
    pub dlq_failures: Counter,
}

fn lease_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers all metrics under the `outbox_relay` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_relay");
        let m = Self {
            pending: Gauge::default(),
            oldest_pending_age_seconds: Gauge::default(),
            retrying: Gauge::default(),
            dead_rows: Gauge::default(),
            published: Counter::default(),
            failures: Family::default(),
            retries: Counter::default(),
            dead: Family::default(),
            dlq_published: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_to_ack_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            batch_errors: Family::default(),
            in_flight_batches: Gauge::default(),
            order_violations: Counter::default(),
            active: Gauge::default(),
            is_leader: Gauge::default(),
            lease_transitions: Gauge::default(),
            lease_write_seconds: Family::new_with_constructor(lease_buckets),
            database_up: Gauge::default(),
            broker_up: Gauge::default(),
            broker_waits: Counter::default(),
            claiming_paused: Gauge::default(),
            dlq_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pending_events",
            "Pending events in the outbox",
            m.pending.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest pending event",
            m.oldest_pending_age_seconds.clone(),
        );
        registry.register(
            "retrying_events",
            "Pending events that failed at least once",
            m.retrying.clone(),
        );
        registry.register("dead_events", "Rows in the dead table", m.dead_rows.clone());
        registry.register(
            "published",
            "Events acknowledged by Kafka",
            m.published.clone(),
        );
        registry.register(
            "delivery_failures",
            "Failed deliveries by reason",
            m.failures.clone(),
        );
        registry.register(
            "retries",
            "Retries scheduled with backoff",
            m.retries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Events moved to the dead table, by reason",
            m.dead.clone(),
        );
        registry.register(
            "dlq_published",
            "Dead events published to a DLQ topic",
            m.dlq_published.clone(),
        );
        registry.register(
            "batch_size",
            "Events per claimed batch",
            m.batch_size.clone(),
        );
        registry.register(
            "commit_to_ack_seconds",
            "Time from the event's created_at to its delivery report",
            m.commit_to_ack_seconds.clone(),
        );
        registry.register(
            "batch_errors",
            "Batches that failed as a whole, by reason",
            m.batch_errors.clone(),
        );
        registry.register(
            "in_flight_batches",
            "Batches claimed and sent whose settle is still to come",
            m.in_flight_batches.clone(),
        );
        registry.register(
            "order_violations",
            "Events acknowledged after an earlier event of their key failed",
            m.order_violations.clone(),
        );
        registry.register("active", "1 while this relay may publish", m.active.clone());
        registry.register(
            "lease_is_leader",
            "1 while this relay holds the Kubernetes Lease",
            m.is_leader.clone(),
        );
        registry.register(
            "lease_transitions",
            "leaseTransitions of the Lease at this relay's last acquisition (its fencing epoch)",
            m.lease_transitions.clone(),
        );
        registry.register(
            "lease_write_seconds",
            "Duration of Lease acquire and renew writes, by result",
            m.lease_write_seconds.clone(),
        );
        registry.register(
            "database_up",
            "1 while the database answers",
            m.database_up.clone(),
        );
        registry.register(
            "broker_up",
            "1 while the Kafka broker answers",
            m.broker_up.clone(),
        );
        registry.register(
            "broker_waits",
            "Times claiming stopped because deliveries failed through the broker's or the network's fault",
            m.broker_waits.clone(),
        );
        registry.register(
            "claiming_paused",
            "1 while the relay does not claim, waiting for the broker to answer again",
            m.claiming_paused.clone(),
        );
        registry.register(
            "dlq_failures",
            "Copies of dead rows to <topic>.dlq that failed and stay due",
            m.dlq_failures.clone(),
        );
        Self { registry, ..m }
    }

    /// Sets the backlog gauges.
    pub fn set_backlog(&self, b: &Backlog) {
        self.pending.set(b.pending);
        self.oldest_pending_age_seconds.set(b.oldest_age_seconds);
        self.retrying.set(b.retrying);
        self.dead_rows.set(b.dead);
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        process_kit::surfaces::render(&self.registry)
    }
}
