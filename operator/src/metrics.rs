//! Prometheus metrics of the operator and the per-object error backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels: the kind reconciled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `OutboxRelay` or `ConsumerGroup`.
    pub kind: String,
}

/// Labels: kind and failure reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// `OutboxRelay` or `ConsumerGroup`.
    pub kind: String,
    /// `KubeApi`, `KafkaError`, ...
    pub reason: String,
}

/// Labels: one ConsumerGroup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl GroupLabel {
    /// The labels of `cg`.
    pub fn of(cg: &crate::crd::ConsumerGroup) -> Self {
        Self {
            namespace: cg.metadata.namespace.clone().unwrap_or_default(),
            name: cg.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Labels: an autoscaling decision's reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `ScaleUp`, `ScaleDown`, `Steady`, ... (`operator::autoscale::Reason`).
    pub reason: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// The registry rendered on `/metrics`.
    pub registry: Registry,
    /// Reconciles run.
    pub reconciles: Family<KindLabel, Counter>,
    /// Reconciles that failed, by reason.
    pub failures: Family<FailureLabel, Counter>,
    /// Reconcile duration.
    pub duration: Family<KindLabel, Histogram>,
    /// Replicas the autoscaler set, per ConsumerGroup with `spec.autoscaling`.
    pub desired_replicas: Family<GroupLabel, Gauge>,
    /// Lag per ConsumerGroup, as last read from the broker.
    pub group_lag: Family<GroupLabel, Gauge>,
    /// Autoscaling decisions, by reason.
    pub autoscale_decisions: Family<ReasonLabel, Counter>,
}

fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("outbox_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let failures = Family::<FailureLabel, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(duration_buckets);
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        let desired_replicas = Family::<GroupLabel, Gauge>::default();
        let group_lag = Family::<GroupLabel, Gauge>::default();
        let autoscale_decisions = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "consumergroup_desired_replicas",
            "Replicas the autoscaler set (ConsumerGroups with spec.autoscaling)",
            desired_replicas.clone(),
        );
        registry.register(
            "consumergroup_lag",
            "Lag of a ConsumerGroup as last read from the broker",
            group_lag.clone(),
        );
        registry.register(
            "autoscale_decisions",
            "Autoscaling decisions, by reason",
            autoscale_decisions.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            desired_replicas,
            group_lag,
            autoscale_decisions,
        }
    }
}

impl Metrics {
    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        outbox::surfaces::render(&self.registry)
    }
}

/// Delay before retrying an object that failed `failures` times in a row: 1 s doubling to 5 min.
pub fn backoff_delay(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Consecutive failures per object (`kind/namespace/name`); a success resets the count.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure and returns the delay before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap();
        let n = f.entry(key.to_owned()).or_default();
        *n += 1;
        backoff_delay(*n)
    }

    /// Records a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap().remove(key);
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_object_caps_and_resets() {
        let b = Backoff::default();
        let d: Vec<_> = (0..11).map(|_| b.failed("a").as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(b.failed("other").as_secs(), 1, "per object");
        b.succeeded("a");
        assert_eq!(b.failures("a"), 0);
        assert_eq!(b.failed("a").as_secs(), 1);
    }
}
