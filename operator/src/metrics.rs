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

/// Labels: one custom resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// `OutboxRelay` or `ConsumerGroup`.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ResourceLabel {
    /// The labels of `obj`.
    pub fn of<K: kube::Resource<DynamicType = ()>>(obj: &K) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }
}

/// Labels: an autoscaling decision's reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// An autoscaling decision (`ScaleUp`, `ScaleDown`, `Steady`, ...: `operator::autoscale::Reason`) or a
    /// Lease write outcome (`ok`, `conflict`, `error`).
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
    /// 1 while a resource's `Ready` condition is True (for "not Ready for 10 minutes" alerts).
    pub resource_ready: Family<ResourceLabel, Gauge>,
    /// 1 while a resource carries `outbox.dev/paused: "true"`.
    pub resource_paused: Family<ResourceLabel, Gauge>,
    /// Pending events of an OutboxRelay, as its leader last reported them.
    pub relay_backlog: Family<ResourceLabel, Gauge>,
    /// Age of an OutboxRelay's oldest pending event, as its leader last reported it.
    pub relay_oldest_pending_age: Family<ResourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while this replica holds the leader Lease and reconciles (or runs without leader election).
    pub leader: Gauge,
    /// Leader Lease writes (acquire, renew) by outcome: `ok`, `conflict`, `error`.
    pub lease_writes: Family<ReasonLabel, Counter>,
    /// Every resource with per-resource metrics, for [`Metrics::retain_resources`].
    known: Mutex<std::collections::HashSet<ResourceLabel>>,
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
        let resource_ready = Family::<ResourceLabel, Gauge>::default();
        let resource_paused = Family::<ResourceLabel, Gauge>::default();
        let relay_backlog = Family::<ResourceLabel, Gauge>::default();
        let relay_oldest_pending_age =
            Family::<ResourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "resource_ready",
            "1 while the resource's Ready condition is True",
            resource_ready.clone(),
        );
        registry.register(
            "resource_paused",
            "1 while the resource is paused (outbox.dev/paused)",
            resource_paused.clone(),
        );
        registry.register(
            "outboxrelay_backlog",
            "Pending events of an OutboxRelay, as its leader reported them",
            relay_backlog.clone(),
        );
        registry.register(
            "outboxrelay_oldest_pending_age_seconds",
            "Age of an OutboxRelay's oldest pending event, as its leader reported it",
            relay_oldest_pending_age.clone(),
        );
        let leader = Gauge::default();
        let lease_writes = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles",
            leader.clone(),
        );
        registry.register(
            "lease_writes",
            "Leader Lease writes (acquire, renew) by outcome",
            lease_writes.clone(),
        );
        Self {
            registry,
            leader,
            lease_writes,
            resource_ready,
            resource_paused,
            relay_backlog,
            relay_oldest_pending_age,
            known: Mutex::default(),
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
        process_kit::surfaces::render(&self.registry)
    }

    /// Records whether a resource is Ready and whether it is paused.
    pub fn record_state(&self, r: ResourceLabel, ready: bool, paused: bool) {
        self.known.lock().unwrap().insert(r.clone());
        self.resource_ready.get_or_create(&r).set(i64::from(ready));
        self.resource_paused
            .get_or_create(&r)
            .set(i64::from(paused));
    }

    /// Records what an OutboxRelay's leader last reported.
    pub fn record_backlog(&self, r: ResourceLabel, backlog: Option<i64>, oldest_age: Option<f64>) {
        self.known.lock().unwrap().insert(r.clone());
        if let Some(b) = backlog {
            self.relay_backlog.get_or_create(&r).set(b);
        }
        if let Some(a) = oldest_age {
            self.relay_oldest_pending_age.get_or_create(&r).set(a);
        }
    }

    /// Forgets every resource not in `live` (deleted ones are never reconciled again, and a stale
    /// `resource_ready 0` would keep an alert firing).
    pub fn retain_resources(&self, live: &[ResourceLabel]) {
        let mut known = self.known.lock().unwrap();
        for r in known.iter().filter(|r| !live.contains(r)) {
            self.resource_ready.remove(r);
            self.resource_paused.remove(r);
            self.relay_backlog.remove(r);
            self.relay_oldest_pending_age.remove(r);
            self.group_lag.remove(&GroupLabel {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            });
            self.desired_replicas.remove(&GroupLabel {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            });
        }
        known.retain(|r| live.contains(r));
    }
}

/// Delay before retrying an object that failed `failures` times in a row: 1 s doubling to 5 min.
pub fn backoff_delay(failures: u32) -> Duration {
    process_kit::backoff::exponential(Duration::from_secs(1), Duration::from_secs(300), failures)
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
    fn per_resource_state_is_exported_and_forgotten_with_the_resource() {
        let m = Metrics::default();
        let r = |name: &str| ResourceLabel {
            kind: "ConsumerGroup".into(),
            namespace: "shop".into(),
            name: name.into(),
        };
        m.record_state(r("pharmacy"), false, true);
        m.record_state(r("billing"), true, false);
        let text = m.render();
        assert!(
            text.contains(r#"outbox_operator_resource_ready{kind="ConsumerGroup",namespace="shop",name="pharmacy"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"outbox_operator_resource_paused{kind="ConsumerGroup",namespace="shop",name="pharmacy"} 1"#));
        m.retain_resources(&[r("billing")]);
        let text = m.render();
        assert!(!text.contains(r#"name="pharmacy""#), "{text}");
        assert!(text.contains(r#"outbox_operator_resource_ready{kind="ConsumerGroup",namespace="shop",name="billing"} 1"#));
    }

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
