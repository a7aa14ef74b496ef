//! Readiness of a consumer: database and broker reachable; how many partitions it owns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use process_kit::surfaces::Surface;
use serde::Serialize;

use crate::metrics::Metrics;

/// Shared health flags, written by the consume loop, the librdkafka callbacks and the DB monitor.
#[derive(Debug, Default)]
pub struct Health {
    database_up: AtomicBool,
    broker_up: AtomicBool,
}

/// The `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Database and broker reachable. A member without partitions (more replicas than partitions) is
    /// still ready: it is a hot standby for the group.
    pub ready: bool,
    /// Database reachable.
    pub database: bool,
    /// At least one broker connection up.
    pub broker: bool,
    /// Partitions assigned to this member.
    pub assigned_partitions: usize,
}

impl Health {
    /// Records the database's state.
    pub fn set_database(&self, up: bool) {
        self.database_up.store(up, Ordering::Relaxed);
    }

    /// Records the broker's state.
    pub fn set_broker(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
    }

    /// The current readiness of a member owning `assigned_partitions` partitions.
    pub fn readiness(&self, assigned_partitions: usize) -> Readiness {
        let database = self.database_up.load(Ordering::Relaxed);
        let broker = self.broker_up.load(Ordering::Relaxed);
        Readiness {
            ready: database && broker,
            database,
            broker,
            assigned_partitions,
        }
    }
}

/// What `/readyz` and `/metrics` of a consumer serve.
#[derive(Clone)]
pub struct Surfaces {
    /// Health flags.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Surface for Surfaces {
    fn readiness(&self) -> (bool, serde_json::Value) {
        // The partition count lives in the metrics gauge the rebalance callback keeps.
        let r = self
            .health
            .readiness(self.metrics.assigned_partitions.get().max(0) as usize);
        (
            r.ready,
            serde_json::to_value(&r).expect("readiness serializes"),
        )
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_database_and_broker_but_not_partitions() {
        let s = Surfaces {
            health: Arc::default(),
            metrics: Arc::default(),
        };
        assert!(!s.readiness().0);
        s.health.set_database(true);
        assert!(!s.readiness().0, "broker still unknown");
        s.health.set_broker(true);
        let (ready, body) = s.readiness();
        assert!(ready, "no partitions is still ready: {body}");
        assert_eq!(body["assigned_partitions"], 0);
        s.metrics.assigned_partitions.set(3);
        s.health.set_database(false);
        let (ready, body) = s.readiness();
        assert!(!ready);
        assert_eq!(body["assigned_partitions"], 3);
    }
}
