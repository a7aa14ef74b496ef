//! Pure planners: the objects a custom resource should own, computed from its spec alone. The reconcilers
//! apply them with server-side apply; tests check them without an API server.
//!
//! `pod` holds what relay and consumer pods share; `relay` and `consumer` the children of each kind.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretKeySelector, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use contract::env::common;

use crate::connection::{self, SecretUse};
use crate::crd::{ConsumerGroup, KafkaSpec, OutboxRelay, SecretKeyRef, Template};

mod consumer;
mod pod;
mod relay;

pub use consumer::*;
pub use pod::*;
pub use relay::*;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "outbox-operator";
/// `outbox.dev/paused: "true"` stops reconciling the object.
pub const PAUSED_ANNOTATION: &str = "outbox.dev/paused";
/// Port of `/healthz`, `/readyz`, `/metrics` in relay and consumer pods.
pub const METRICS_PORT: i32 = 9090;
/// Non-root user of the images (distroless `nonroot`).
pub const RUN_AS_USER: i64 = 65532;

/// A spec the API server accepted but the operator cannot act on; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// JSON path of the field, e.g. `spec.env[2].name`.
    pub field: String,
    /// Why.
    pub reason: String,
}

pub(super) fn spec_error(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Operator-wide settings the planners need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Relay image when an OutboxRelay names none.
    pub relay_image: String,
}

/// Whether the object carries the pause annotation.
pub fn is_paused<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(PAUSED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// Name of the relay's children (Deployment, Service, ServiceAccount, Role, RoleBinding, PDB, Lease).
pub fn relay_child_name(cr: &OutboxRelay) -> String {
    format!("{}-relay", cr.metadata.name.as_deref().unwrap_or_default())
}

/// Name of a consumer group's children.
pub fn consumer_child_name(cr: &ConsumerGroup) -> String {
    format!(
        "{}-consumer",
        cr.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pod selector labels (stable for the life of the object: a Deployment selector is immutable).
pub fn selector_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".into(),
            format!("outbox-{component}"),
        ),
        ("app.kubernetes.io/instance".into(), instance.into()),
    ])
}

/// Recommended labels of every child object.
pub fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(component, instance);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l.insert("app.kubernetes.io/part-of".into(), "outbox".into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

/// `k=v,k=v`, the string form `/scale` and HPA expect in `.status.selector`.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests;
