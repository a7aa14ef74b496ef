//! Readiness of a consumer: database and broker reachable; how many partitions it owns.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use outbox::surfaces::Surface;
use serde::Serialize;

use crate::metrics::Metrics;

/// Shared health flags, written by the consume loop, the librdkafka callbacks and the DB monitor.
#[derive(Debug, Default)]
pub struct Health {
    database_up: AtomicBool,
    broker_up: AtomicBool,
    assigned: AtomicUsize,
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

    /// Records how many partitions this member owns.
    pub fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Ordering::Relaxed);
    }

    /// The current readiness.
    pub fn readiness(&self) -> Readiness {
        let database = self.database_up.load(Ordering::Relaxed);
        let broker = self.broker_up.load(Ordering::Relaxed);
        Readiness {
            ready: database && broker,
            database,
            broker,
            assigned_partitions: self.assigned.load(Ordering::Relaxed),
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
        let r = self.health.readiness();
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
        let h = Health::default();
        assert!(!h.readiness().ready);
        h.set_database(true);
        assert!(!h.readiness().ready, "broker still unknown");
        h.set_broker(true);
        let r = h.readiness();
        assert!(r.ready);
        assert_eq!(r.assigned_partitions, 0);
        h.set_assigned(3);
        h.set_database(false);
        let r = h.readiness();
        assert!(!r.ready);
        assert_eq!(r.assigned_partitions, 3);
    }
}
