//! Readiness of a consumer: database and broker reachable; how many partitions it owns.

use std::sync::Arc;

use process_kit::surfaces::{Reachability, Surface};
use serde::Serialize;

use crate::metrics::Metrics;

/// Shared health flags, written by the consume loop, the librdkafka callbacks and the DB monitor: the
/// database and the broker reachable, nothing else.
#[derive(Debug, Default)]
pub struct Health {
    reach: Reachability,
    stopped_at_gap: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for Health {
    type Target = Reachability;

    fn deref(&self) -> &Reachability {
        &self.reach
    }
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
    /// A partition is stopped at an offset gap seen twice (not ready: someone must look).
    pub stopped_at_gap: bool,
    /// Partitions assigned to this member.
    pub assigned_partitions: usize,
}

impl Health {
    /// The current readiness of a member owning `assigned_partitions` partitions.
    pub fn readiness(&self, assigned_partitions: usize) -> Readiness {
        let (database, broker) = (self.database(), self.broker());
        let stopped_at_gap = self
            .stopped_at_gap
            .load(std::sync::atomic::Ordering::Relaxed);
        Readiness {
            ready: database && broker && !stopped_at_gap,
            database,
            broker,
            stopped_at_gap,
            assigned_partitions,
        }
    }

    /// Records whether a partition is stopped at an offset gap.
    pub fn set_stopped_at_gap(&self, stopped: bool) {
        self.stopped_at_gap
            .store(stopped, std::sync::atomic::Ordering::Relaxed);
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
