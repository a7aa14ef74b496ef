//! Who writes which status field, as types. Each writer sends a JSON merge patch of the status subresource
//! holding its own fields only, so two writers never overwrite each other (a merge patch leaves absent
//! fields alone). The tests below check that the writers' fields are disjoint and together cover each
//! status schema, so a new status field cannot go in without an owner.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::Serialize;

use crate::crd::AutoscalingStatus;

/// The operator's verdict alone: conditions, and the generation they describe. What a reconcile writes
/// when it stops early (paused, invalid spec, a Secret or permission problem), on either kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// kstatus conditions.
    pub conditions: Vec<Condition>,
    /// Generation the conditions describe; absent leaves the previous one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The operator's fields of an `OutboxRelay` status: its verdict and the coordination it reads from the
/// relay's Lease.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayByOperator {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The Lease's holder: `None` leaves the field (no Lease yet), `Some(None)` clears it (a released
    /// Lease has no holder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<Option<String>>,
    /// The Lease's `leaseTransitions` (the fencing epoch); `None` leaves the field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<Option<i32>>,
}

/// The leading relay's fields of its `OutboxRelay` status: what only it knows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayByRelay {
    /// Pending events.
    pub backlog: i64,
    /// Age of the oldest pending event, in seconds.
    pub oldest_pending_age_seconds: f64,
}

/// A `ConsumerGroup` status has one writer, the operator: this whole, or a [`Verdict`] when a reconcile
/// stops early.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupByOperator {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Pods of the consumer Deployment.
    pub replicas: i32,
    /// Ready pods.
    pub ready_replicas: i32,
    /// Label selector of the pods (for `/scale`).
    pub selector: String,
    /// Partitions per topic as the broker reports them.
    pub partitions: BTreeMap<String, i32>,
    /// Sum of `partitions`.
    pub total_partitions: i32,
    /// Total lag; `None` clears it (not readable now: an old figure would mislead).
    pub lag: Option<i64>,
    /// The autoscaler's last decision; `None` clears it (autoscaling off).
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The JSON merge patch of a status subresource that sets `fields`.
pub fn merge_patch(fields: &impl Serialize) -> serde_json::Value {
    serde_json::json!({ "status": fields })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kube::CustomResourceExt;

    use super::*;
    use crate::crd::{ConsumerGroup, ConsumerGroupStatus, OutboxRelay};

    fn keys(v: &impl Serialize) -> BTreeSet<String> {
        serde_json::to_value(v)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn schema_fields(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> BTreeSet<String> {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        schema["openAPIV3Schema"]["properties"]["status"]["properties"]
            .as_object()
            .expect("a status schema")
            .keys()
            .cloned()
            .collect()
    }

    fn verdict() -> Verdict {
        Verdict {
            conditions: vec![],
            observed_generation: Some(1),
        }
    }

    #[test]
    fn relay_status_fields_have_exactly_one_writer() {
        let operator = keys(&RelayByOperator {
            verdict: verdict(),
            leader: Some(Some("relay-0".into())),
            lease_transitions: Some(Some(3)),
        });
        let relay = keys(&RelayByRelay {
            backlog: 0,
            oldest_pending_age_seconds: 0.0,
        });
        assert!(operator.is_disjoint(&relay), "{operator:?} {relay:?}");
        let all: BTreeSet<String> = operator.union(&relay).cloned().collect();
        assert_eq!(all, schema_fields(&OutboxRelay::crd()));
    }

    fn group(lag: Option<i64>, autoscaling: Option<AutoscalingStatus>) -> GroupByOperator {
        GroupByOperator {
            verdict: verdict(),
            replicas: 2,
            ready_replicas: 1,
            selector: "app=x".into(),
            partitions: [("orders".to_owned(), 6)].into(),
            total_partitions: 6,
            lag,
            autoscaling,
        }
    }

    #[test]
    fn group_status_fields_are_all_the_operators() {
        let full = group(Some(0), Some(AutoscalingStatus::default()));
        assert_eq!(keys(&full), schema_fields(&ConsumerGroup::crd()));
        // What the operator writes reads back as the status type.
        let back: ConsumerGroupStatus =
            serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(back.autoscaling, Some(AutoscalingStatus::default()));
        assert_eq!(back.total_partitions, 6);
    }

    #[test]
    fn a_group_status_without_lag_or_autoscaling_clears_them() {
        let patch = merge_patch(&group(None, None));
        assert_eq!(patch["status"]["lag"], serde_json::Value::Null);
        assert_eq!(patch["status"]["autoscaling"], serde_json::Value::Null);
        assert!(patch["status"]
            .as_object()
            .unwrap()
            .contains_key("autoscaling"));
    }

    #[test]
    fn absent_fields_are_left_alone_and_a_released_lease_clears_the_leader() {
        let stopped_early = RelayByOperator {
            verdict: Verdict {
                conditions: vec![],
                observed_generation: None,
            },
            leader: None,
            lease_transitions: None,
        };
        assert_eq!(
            merge_patch(&stopped_early),
            serde_json::json!({"status": {"conditions": []}})
        );
        let released = RelayByOperator {
            verdict: verdict(),
            leader: Some(None),
            lease_transitions: Some(Some(4)),
        };
        assert_eq!(
            merge_patch(&released)["status"],
            serde_json::json!({"conditions": [], "observedGeneration": 1, "leader": null, "leaseTransitions": 4})
        );
    }
}
