//! Pure planners: the objects a custom resource should own, computed from its spec alone. The reconcilers
//! apply them with server-side apply; tests check them without an API server.

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

use contract::env::{common, consumer, relay};

use crate::connection::{self, SecretUse};
use crate::crd::{ConsumerGroup, KafkaSpec, OutboxRelay, SecretKeyRef, Template};

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

fn spec_error(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
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

fn owner<K: Resource<DynamicType = ()>>(cr: &K) -> Vec<OwnerReference> {
    cr.controller_owner_ref(&()).into_iter().collect()
}

fn meta<K: Resource<DynamicType = ()>>(cr: &K, name: &str, component: &str) -> ObjectMeta {
    let instance = cr.meta().name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name.into()),
        namespace: cr.meta().namespace.clone(),
        labels: Some(labels(component, &instance)),
        owner_references: Some(owner(cr)),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_secret(name: &str, s: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.name.clone(),
                key: s.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn kafka_env(kafka: &KafkaSpec, config_var: &str) -> Vec<EnvVar> {
    let mut v = vec![env(common::KAFKA_BOOTSTRAP, kafka.bootstrap.clone())];
    if let Some(s) = &kafka.config_secret_ref {
        v.push(env_secret(config_var, s));
    }
    v.extend(connection::kafka_env(kafka));
    v
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

/// Pod-level restricted security (Pod Security Standards "restricted").
pub fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        // Group of mounted Secret files (mode 0400 becomes 0440 root:65532), so the process reads them.
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// Container-level restricted security: read-only root, no escalation, no capabilities.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// The pod template shared by relays and consumers: one container, probes on /healthz and /readyz,
/// the metrics port, restricted security, a writable /tmp on an emptyDir (the root is read-only), the
/// mounted Secret keys of the connections, then the user's `spec.template` (checked by
/// [`validate_template`] first, so it adds and never replaces).
fn pod_template(
    component: &str,
    instance: &str,
    service_account: Option<String>,
    mut container: Container,
    files: &[SecretUse],
    template: Option<&Template>,
) -> PodTemplateSpec {
    let mut labels = labels(component, instance);
    labels.retain(|k, _| k != "app.kubernetes.io/managed-by");
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".into(), "true".into()),
        ("prometheus.io/port".into(), METRICS_PORT.to_string()),
    ]);
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if let Some((v, m)) = connection::secrets_volume(files) {
        volumes.push(v);
        mounts.push(m);
    }
    let pod_settings = template.and_then(|t| t.pod.clone()).unwrap_or_default();
    let container_settings = template
        .and_then(|t| t.container.clone())
        .unwrap_or_default();
    if let Some(m) = &pod_settings.metadata {
        labels.extend(m.labels.clone());
        annotations.extend(m.annotations.clone());
    }
    volumes.extend(pod_settings.volumes);
    mounts.extend(container_settings.volume_mounts);
    container
        .env
        .get_or_insert_with(Vec::new)
        .extend(container_settings.env);
    container.env_from = non_empty(container_settings.env_from);
    let service_account = pod_settings.service_account_name.or(service_account);
    fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
        (!v.is_empty()).then_some(v)
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: service_account,
            automount_service_account_token: Some(component == "relay"),
            security_context: Some(restricted_pod_security()),
            termination_grace_period_seconds: Some(30),
            image_pull_secrets: non_empty(pod_settings.image_pull_secrets),
            node_selector: (!pod_settings.node_selector.is_empty())
                .then_some(pod_settings.node_selector),
            tolerations: non_empty(pod_settings.tolerations),
            affinity: pod_settings.affinity,
            topology_spread_constraints: non_empty(pod_settings.topology_spread_constraints),
            priority_class_name: pod_settings.priority_class_name,
            containers: vec![Container {
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: METRICS_PORT,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                liveness_probe: Some(http_probe("/healthz", 10, 3)),
                readiness_probe: Some(http_probe("/readyz", 5, 2)),
                security_context: Some(restricted_container_security()),
                volume_mounts: Some(mounts),
                ..container
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
    }
}

/// Annotation of the pod template holding a hash of every Secret key the pods read: a rotated Secret
/// changes it, and the Deployment rolls.
pub const SECRET_HASH_ANNOTATION: &str = "outbox.dev/secret-hash";

/// `deployment` with the hash of its Secrets' data on the pod template.
pub fn with_secret_hash(mut deployment: Deployment, hash: &str) -> Deployment {
    if let Some(spec) = deployment.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SECRET_HASH_ANNOTATION.into(), hash.into());
    }
    deployment
}

/// Refuses a `spec.template` that would replace what the operator sets: its labels, annotations,
/// volumes, mount paths or environment; and a ServiceAccount on a relay.
pub fn validate_template(
    template: Option<&Template>,
    component: &str,
    managed_env: &[EnvVar],
) -> Result<(), SpecError> {
    let Some(t) = template else { return Ok(()) };
    let pod = t.pod.clone().unwrap_or_default();
    if let Some(m) = &pod.metadata {
        if let Some(k) = m
            .labels
            .keys()
            .find(|k| k.starts_with("app.kubernetes.io/"))
        {
            return Err(spec_error(
                format!("spec.template.pod.metadata.labels[{k}]"),
                "app.kubernetes.io/* labels are set by the operator (the Deployment selects on them)",
            ));
        }
        if let Some(k) = m
            .annotations
            .keys()
            .find(|k| k.starts_with("outbox.dev/") || k.starts_with("prometheus.io/"))
        {
            return Err(spec_error(
                format!("spec.template.pod.metadata.annotations[{k}]"),
                "outbox.dev/* and prometheus.io/* annotations are set by the operator",
            ));
        }
    }
    if component == "relay" && pod.service_account_name.is_some() {
        return Err(spec_error(
            "spec.template.pod.serviceAccountName",
            "a relay runs as the `<name>-relay` ServiceAccount the operator binds to its Lease Role",
        ));
    }
    for (i, v) in pod.volumes.iter().enumerate() {
        if v.name == "tmp" || v.name.starts_with("outbox-") {
            return Err(spec_error(
                format!("spec.template.pod.volumes[{i}].name"),
                format!("`{}` is the operator's (tmp, outbox-*)", v.name),
            ));
        }
    }
    let c = t.container.clone().unwrap_or_default();
    for (i, m) in c.volume_mounts.iter().enumerate() {
        let p = m.mount_path.trim_end_matches('/');
        if p == "/tmp" || p == connection::SECRETS_DIR || p.starts_with("/etc/outbox/") {
            return Err(spec_error(
                format!("spec.template.container.volumeMounts[{i}].mountPath"),
                format!(
                    "`{}` is the operator's (/tmp, {})",
                    m.mount_path,
                    connection::SECRETS_DIR
                ),
            ));
        }
        if !pod.volumes.iter().any(|v| v.name == m.name) {
            return Err(spec_error(
                format!("spec.template.container.volumeMounts[{i}].name"),
                format!("no volume `{}` in spec.template.pod.volumes", m.name),
            ));
        }
    }
    for (i, e) in c.env.iter().enumerate() {
        if managed_env.iter().any(|m| m.name == e.name) {
            return Err(spec_error(
                format!("spec.template.container.env[{i}].name"),
                format!("{} is set by the operator from the spec", e.name),
            ));
        }
    }
    Ok(())
}

fn deployment(
    meta: ObjectMeta,
    replicas: i32,
    selector: BTreeMap<String, String>,
    template: PodTemplateSpec,
    strategy: Option<DeploymentStrategy>,
) -> Deployment {
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            template,
            strategy,
            ..Default::default()
        }),
        status: None,
    }
}

fn metrics_service(meta: ObjectMeta, selector: BTreeMap<String, String>) -> Service {
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn pdb(meta: ObjectMeta, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Environment variables the operator sets itself; `spec.env` may not override them.
fn check_env_overrides(user: &[EnvVar], managed: &[EnvVar]) -> Result<(), SpecError> {
    for (i, e) in user.iter().enumerate() {
        if managed.iter().any(|m| m.name == e.name) {
            return Err(spec_error(
                format!("spec.env[{i}].name"),
                format!("{} is set by the operator from the spec", e.name),
            ));
        }
    }
    Ok(())
}

/// Everything an OutboxRelay owns.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayChildren {
    /// Identity of the relay pods.
    pub service_account: ServiceAccount,
    /// Leases (get, create, update) and its own status (get, patch).
    pub role: Role,
    /// Binds the role to the service account.
    pub role_binding: RoleBinding,
    /// The relay pods.
    pub deployment: Deployment,
    /// The metrics Service.
    pub service: Service,
    /// With more than one replica: at most one voluntary disruption at a time.
    pub pdb: Option<PodDisruptionBudget>,
}

fn seconds(s: i32) -> String {
    format!("{s}s")
}

/// The relay's environment, from the spec.
fn relay_env(cr: &OutboxRelay) -> Vec<EnvVar> {
    let s = &cr.spec;
    let name = cr.metadata.name.clone().unwrap_or_default();
    let mut v = vec![
        env_secret(common::DATABASE_URL, &s.database.secret_ref),
        env(relay::OUTBOX_SCHEMA, s.database.schema.clone()),
    ];
    v.extend(connection::database_env(s.database.tls.as_ref()));
    v.extend(kafka_env(&s.kafka, relay::KAFKA_CONFIG));
    v.extend([
        env(relay::COORDINATION, s.coordination.mode.env_value()),
        env(relay::LEASE_NAME, relay_child_name(cr)),
        env(
            relay::LEASE_DURATION,
            seconds(s.coordination.lease_duration_seconds),
        ),
        env(
            relay::RENEW_DEADLINE,
            seconds(s.coordination.renew_deadline_seconds),
        ),
        env(
            relay::RETRY_PERIOD,
            seconds(s.coordination.retry_period_seconds),
        ),
        env(relay::FENCE_SCOPE, name.clone()),
        env(relay::STATUS_RESOURCE, name),
        env(relay::STANDBY_READY, "true"),
        env(relay::BATCH_SIZE, s.batch_size.to_string()),
        env(relay::IN_FLIGHT_BATCHES, s.in_flight_batches.to_string()),
        env(relay::POLL_INTERVAL, format!("{}ms", s.poll_interval_ms)),
        env(relay::MAX_ATTEMPTS, s.max_attempts.to_string()),
        env(relay::POISON, s.poison.env_value()),
        env(relay::DLQ, s.dlq.to_string()),
        env(relay::RETENTION, s.retention.env_value()),
        env(relay::HTTP_ADDR, format!("0.0.0.0:{METRICS_PORT}")),
        env(common::LOG_FORMAT, "json"),
        env_field(common::POD_NAME, "metadata.name"),
        env_field(common::POD_NAMESPACE, "metadata.namespace"),
    ]);
    v
}

/// The Secret keys a relay pod mounts.
pub fn relay_files(cr: &OutboxRelay) -> Vec<SecretUse> {
    let mut f = connection::kafka_files(&cr.spec.kafka);
    f.extend(connection::database_files(cr.spec.database.tls.as_ref()));
    f
}

/// The Secret keys a consumer pod mounts.
pub fn consumer_files(cr: &ConsumerGroup) -> Vec<SecretUse> {
    let mut f = connection::kafka_files(&cr.spec.kafka);
    f.extend(connection::database_files(cr.spec.database.tls.as_ref()));
    f
}

fn by_env(field: &str, r: &SecretKeyRef) -> SecretUse {
    SecretUse {
        field: field.into(),
        secret: r.name.clone(),
        key: r.key.clone(),
        file: None,
    }
}

/// The Secret keys of a Kafka connection (`configSecretRef` and the mounted ones): what the topic admin
/// reads.
pub fn kafka_secret_uses(kafka: &KafkaSpec) -> Vec<SecretUse> {
    let mut v: Vec<SecretUse> = kafka
        .config_secret_ref
        .iter()
        .map(|r| by_env("spec.kafka.configSecretRef", r))
        .collect();
    v.extend(connection::kafka_files(kafka));
    v
}

/// Every Secret key a relay pod reads (mounted or through env): checked before anything is applied, and
/// hashed into the pod template.
pub fn relay_secret_uses(cr: &OutboxRelay) -> Vec<SecretUse> {
    let mut v = vec![by_env(
        "spec.database.secretRef",
        &cr.spec.database.secret_ref,
    )];
    v.extend(kafka_secret_uses(&cr.spec.kafka));
    v.extend(connection::database_files(cr.spec.database.tls.as_ref()));
    v
}

/// Every Secret key a consumer pod reads.
pub fn consumer_secret_uses(cr: &ConsumerGroup) -> Vec<SecretUse> {
    let mut v = vec![by_env(
        "spec.database.secretRef",
        &cr.spec.database.secret_ref,
    )];
    v.extend(kafka_secret_uses(&cr.spec.kafka));
    v.extend(connection::database_files(cr.spec.database.tls.as_ref()));
    v
}

/// The `deletionPolicy: Delete` topics of `deleting` that another ConsumerGroup on the same Kafka
/// (same bootstrap) still lists, with those groups as `namespace/name`.
pub fn topics_held_by_others(
    deleting: &ConsumerGroup,
    all: &[ConsumerGroup],
) -> BTreeMap<String, Vec<String>> {
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let me = (&deleting.metadata.namespace, &deleting.metadata.name);
    for other in all {
        if (&other.metadata.namespace, &other.metadata.name) == me
            || other.metadata.deletion_timestamp.is_some()
            || other.spec.kafka.bootstrap != deleting.spec.kafka.bootstrap
        {
            continue;
        }
        for t in &deleting.spec.topics {
            if t.deletion_policy == crate::crd::DeletionPolicy::Delete
                && other.spec.topics.iter().any(|o| o.name == t.name)
            {
                held.entry(t.name.clone()).or_default().push(format!(
                    "{}/{}",
                    other.metadata.namespace.as_deref().unwrap_or_default(),
                    other.metadata.name.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    held
}

/// Checks what the schema cannot (or what an API server without CEL support let through).
pub fn validate_relay(cr: &OutboxRelay) -> Result<(), SpecError> {
    let c = &cr.spec.coordination;
    if !(c.lease_duration_seconds > c.renew_deadline_seconds
        && c.renew_deadline_seconds > c.retry_period_seconds)
    {
        return Err(spec_error(
            "spec.coordination",
            format!(
                "lease duration ({}s) must exceed the renew deadline ({}s), which must exceed the retry period ({}s)",
                c.lease_duration_seconds, c.renew_deadline_seconds, c.retry_period_seconds
            ),
        ));
    }
    if cr
        .spec
        .image
        .as_deref()
        .is_some_and(|i| i.trim().is_empty())
    {
        return Err(spec_error("spec.image", "must not be empty when set"));
    }
    validate_template(cr.spec.template.as_ref(), "relay", &relay_env(cr))?;
    if cr.metadata.name.as_deref().unwrap_or_default().len() > 57 {
        return Err(spec_error(
            "metadata.name",
            "at most 57 characters (children are named `<name>-relay`)",
        ));
    }
    Ok(())
}

/// The children of an OutboxRelay.
pub fn desired_relay(cr: &OutboxRelay, defaults: &Defaults) -> Result<RelayChildren, SpecError> {
    validate_relay(cr)?;
    let instance = cr.metadata.name.clone().unwrap_or_default();
    let name = relay_child_name(cr);
    let m = || meta(cr, &name, "relay");
    let selector = selector_labels("relay", &instance);
    let container = Container {
        name: "relay".into(),
        image: Some(
            cr.spec
                .image
                .clone()
                .unwrap_or_else(|| defaults.relay_image.clone()),
        ),
        args: Some(vec!["run".into()]),
        env: Some(relay_env(cr)),
        resources: cr.spec.resources.clone(),
        ..Default::default()
    };
    // Standbys are Ready (RELAY_STANDBY_READY), so a surge pod can become available and the rollout
    // proceeds; the new pod stands by until the old leader stops and its Lease expires or is released.
    let strategy = DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    };
    let replicas = cr.spec.replicas;
    Ok(RelayChildren {
        service_account: ServiceAccount {
            metadata: m(),
            ..Default::default()
        },
        role: Role {
            metadata: m(),
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(vec!["coordination.k8s.io".into()]),
                    resources: Some(vec!["leases".into()]),
                    verbs: vec!["get".into(), "create".into(), "update".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec![crate::crd::GROUP.into()]),
                    resources: Some(vec!["outboxrelays/status".into()]),
                    resource_names: Some(vec![instance.clone()]),
                    verbs: vec!["get".into(), "patch".into()],
                    ..Default::default()
                },
            ]),
        },
        role_binding: RoleBinding {
            metadata: m(),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.clone(),
                namespace: cr.metadata.namespace.clone(),
                api_group: None,
            }]),
        },
        deployment: deployment(
            m(),
            replicas,
            selector.clone(),
            pod_template(
                "relay",
                &instance,
                Some(name.clone()),
                container,
                &relay_files(cr),
                cr.spec.template.as_ref(),
            ),
            Some(strategy),
        ),
        service: metrics_service(m(), selector.clone()),
        pdb: (replicas > 1).then(|| pdb(m(), selector)),
    })
}

/// Everything a ConsumerGroup owns.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerChildren {
    /// The consumer pods.
    pub deployment: Deployment,
    /// The metrics Service.
    pub service: Service,
    /// With more than one replica: at most one voluntary disruption at a time.
    pub pdb: Option<PodDisruptionBudget>,
}

fn consumer_env(cr: &ConsumerGroup) -> Vec<EnvVar> {
    let s = &cr.spec;
    let mut v = vec![
        env(consumer::GROUP_ID, s.group_id.clone()),
        env(
            consumer::TOPICS,
            s.topics
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        env_secret(common::DATABASE_URL, &s.database.secret_ref),
        env(consumer::INBOX_SCHEMA, s.database.schema.clone()),
    ];
    v.extend(connection::database_env(s.database.tls.as_ref()));
    v.extend(kafka_env(&s.kafka, consumer::KAFKA_CONFIG));
    v.extend([
        env(consumer::HTTP_ADDR, format!("0.0.0.0:{METRICS_PORT}")),
        env(common::LOG_FORMAT, "json"),
        env_field(consumer::INSTANCE_ID, "metadata.name"),
    ]);
    v
}

/// Checks what the schema cannot: duplicate topics, env overriding what the operator sets.
pub fn validate_consumer(cr: &ConsumerGroup) -> Result<(), SpecError> {
    let s = &cr.spec;
    for (i, t) in s.topics.iter().enumerate() {
        if s.topics[..i].iter().any(|o| o.name == t.name) {
            return Err(spec_error(
                format!("spec.topics[{i}].name"),
                format!("topic `{}` is listed twice", t.name),
            ));
        }
    }
    if s.image.trim().is_empty() {
        return Err(spec_error("spec.image", "must not be empty"));
    }
    if s.replicas < 0 {
        return Err(spec_error("spec.replicas", "must not be negative"));
    }
    check_env_overrides(&s.env, &consumer_env(cr))?;
    validate_template(s.template.as_ref(), "consumer", &consumer_env(cr))?;
    if cr.metadata.name.as_deref().unwrap_or_default().len() > 54 {
        return Err(spec_error(
            "metadata.name",
            "at most 54 characters (children are named `<name>-consumer`)",
        ));
    }
    Ok(())
}

/// The children of a ConsumerGroup running `replicas` pods (after the partition policy).
pub fn desired_consumer(cr: &ConsumerGroup, replicas: i32) -> Result<ConsumerChildren, SpecError> {
    validate_consumer(cr)?;
    let instance = cr.metadata.name.clone().unwrap_or_default();
    let name = consumer_child_name(cr);
    let m = || meta(cr, &name, "consumer");
    let selector = selector_labels("consumer", &instance);
    let mut env = consumer_env(cr);
    env.extend(cr.spec.env.iter().cloned());
    let container = Container {
        name: "consumer".into(),
        image: Some(cr.spec.image.clone()),
        env: Some(env),
        resources: cr.spec.resources.clone(),
        ..Default::default()
    };
    Ok(ConsumerChildren {
        deployment: deployment(
            m(),
            replicas,
            selector.clone(),
            pod_template(
                "consumer",
                &instance,
                None,
                container,
                &consumer_files(cr),
                cr.spec.template.as_ref(),
            ),
            None,
        ),
        service: metrics_service(m(), selector.clone()),
        pdb: (replicas > 1).then(|| pdb(m(), selector)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumerGroupSpec, OutboxRelaySpec};
    use serde_json::json;

    fn relay(spec: serde_json::Value) -> OutboxRelay {
        let mut base = json!({
            "database": {"secretRef": {"name": "orders-db", "key": "url"}},
            "kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "kafka", "key": "props"}},
        });
        base.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let mut cr = OutboxRelay::new(
            "orders",
            serde_json::from_value::<OutboxRelaySpec>(base).unwrap(),
        );
        cr.metadata.namespace = Some("shop".into());
        cr.metadata.uid = Some("uid-1".into());
        cr
    }

    fn group(spec: serde_json::Value) -> ConsumerGroup {
        let mut base = json!({
            "groupId": "pharmacy", "image": "demo-consumer:1",
            "kafka": {"bootstrap": "kafka:9092"},
            "database": {"secretRef": {"name": "orders-db", "key": "url"}},
            "topics": [{"name": "orders", "partitions": 6}],
        });
        base.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let mut cr = ConsumerGroup::new(
            "pharmacy",
            serde_json::from_value::<ConsumerGroupSpec>(base).unwrap(),
        );
        cr.metadata.namespace = Some("shop".into());
        cr.metadata.uid = Some("uid-2".into());
        cr
    }

    fn defaults() -> Defaults {
        Defaults {
            relay_image: "outbox-relay:9".into(),
        }
    }

    fn env_of(d: &Deployment) -> BTreeMap<String, EnvVar> {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    fn value(env: &BTreeMap<String, EnvVar>, k: &str) -> String {
        env[k]
            .value
            .clone()
            .unwrap_or_else(|| panic!("{k} has no literal value"))
    }

    #[test]
    fn relay_children_carry_owner_labels_and_the_spec() {
        let cr = relay(
            json!({"replicas": 2, "retention": "Archive", "poison": "Skip", "dlq": true,
            "coordination": {"leaseDurationSeconds": 20, "renewDeadlineSeconds": 12, "retryPeriodSeconds": 3}}),
        );
        let c = desired_relay(&cr, &defaults()).unwrap();
        for m in [
            &c.service_account.metadata,
            &c.role.metadata,
            &c.role_binding.metadata,
            &c.deployment.metadata,
            &c.service.metadata,
            &c.pdb.as_ref().expect("a PDB with 2 replicas").metadata,
        ] {
            assert_eq!(m.name.as_deref(), Some("orders-relay"));
            assert_eq!(m.namespace.as_deref(), Some("shop"));
            let o = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
                ("OutboxRelay", "orders", "uid-1")
            );
            assert_eq!(o.controller, Some(true));
            assert_eq!(
                m.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
                "outbox-operator"
            );
        }
        let d = c.deployment.spec.as_ref().unwrap();
        assert_eq!(d.replicas, Some(2));
        let pod = d.template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("orders-relay"));
        assert_eq!(pod.containers[0].image.as_deref(), Some("outbox-relay:9"));
        let env = env_of(&c.deployment);
        assert_eq!(value(&env, "RELAY_COORDINATION"), "lease");
        assert_eq!(value(&env, "RELAY_LEASE_NAME"), "orders-relay");
        assert_eq!(value(&env, "RELAY_LEASE_DURATION"), "20s");
        assert_eq!(value(&env, "RELAY_RENEW_DEADLINE"), "12s");
        assert_eq!(value(&env, "RELAY_RETRY_PERIOD"), "3s");
        assert_eq!(value(&env, "RELAY_RETENTION"), "archive");
        assert_eq!(value(&env, "RELAY_POISON"), "skip");
        assert_eq!(value(&env, "RELAY_DLQ"), "true");
        assert_eq!(value(&env, "RELAY_STATUS_RESOURCE"), "orders");
        assert_eq!(value(&env, "RELAY_STANDBY_READY"), "true");
        // Secrets only by reference.
        let db = env["DATABASE_URL"]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((db.name.as_str(), db.key.as_str()), ("orders-db", "url"));
        assert!(env["DATABASE_URL"].value.is_none());
        let k = env["RELAY_KAFKA_CONFIG"]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(k.name, "kafka");
        assert_eq!(
            env["POD_NAME"]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.name"
        );
        // Role: exactly Leases get/create/update and its own status.
        let rules = c.role.rules.as_ref().unwrap();
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["leases".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "create", "update"]);
        assert_eq!(
            rules[1].resources.as_deref(),
            Some(&["outboxrelays/status".to_string()][..])
        );
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["orders".to_string()][..])
        );
        assert_eq!(
            c.role_binding.subjects.as_ref().unwrap()[0].name,
            "orders-relay"
        );
        assert_eq!(c.role_binding.role_ref.name, "orders-relay");
        // The Service selects the pods.
        let sel = c.service.spec.as_ref().unwrap().selector.clone().unwrap();
        let pod_labels = d
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        assert!(sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(d.selector.match_labels.as_ref(), Some(&sel));
    }

    #[test]
    fn pods_are_restricted_and_probed() {
        let c = desired_relay(&relay(json!({})), &defaults()).unwrap();
        let g = desired_consumer(&group(json!({})), 1).unwrap();
        for d in [&c.deployment, &g.deployment] {
            let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let ps = pod.security_context.as_ref().unwrap();
            assert_eq!(ps.run_as_non_root, Some(true));
            assert_eq!(ps.run_as_user, Some(RUN_AS_USER));
            assert_eq!(ps.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
            let ctr = &pod.containers[0];
            let cs = ctr.security_context.as_ref().unwrap();
            assert_eq!(cs.allow_privilege_escalation, Some(false));
            assert_eq!(cs.read_only_root_filesystem, Some(true));
            assert_eq!(
                cs.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            let path =
                |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone();
            assert_eq!(path(&ctr.liveness_probe).as_deref(), Some("/healthz"));
            assert_eq!(path(&ctr.readiness_probe).as_deref(), Some("/readyz"));
            assert_eq!(ctr.ports.as_ref().unwrap()[0].container_port, METRICS_PORT);
        }
    }

    #[test]
    fn one_relay_replica_gets_no_pdb_and_an_own_image_wins() {
        let c = desired_relay(
            &relay(json!({"replicas": 1, "image": "mine:2"})),
            &defaults(),
        )
        .unwrap();
        assert!(c.pdb.is_none());
        let pod = c.deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("mine:2"));
    }

    #[test]
    fn bad_relay_specs_name_the_field() {
        let e = desired_relay(
            &relay(
                json!({"coordination": {"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}}),
            ),
            &defaults(),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.coordination");
        assert!(
            e.to_string()
                .contains("lease duration (10s) must exceed the renew deadline (10s)"),
            "{e}"
        );
        let e = desired_relay(&relay(json!({"image": " "})), &defaults()).unwrap_err();
        assert_eq!(e.field, "spec.image");
    }

    #[test]
    fn consumer_children_carry_group_topics_and_replicas() {
        let cr = group(
            json!({"topics": [{"name": "orders", "partitions": 6}, {"name": "returns", "partitions": 2}],
            "env": [{"name": "DEMO_ROLE", "value": "pharmacy"}]}),
        );
        let c = desired_consumer(&cr, 3).unwrap();
        assert_eq!(c.deployment.spec.as_ref().unwrap().replicas, Some(3));
        assert_eq!(
            c.deployment.metadata.name.as_deref(),
            Some("pharmacy-consumer")
        );
        let env = env_of(&c.deployment);
        assert_eq!(value(&env, "CONSUMER_GROUP_ID"), "pharmacy");
        assert_eq!(value(&env, "CONSUMER_TOPICS"), "orders,returns");
        assert_eq!(value(&env, "CONSUMER_INBOX_SCHEMA"), "inbox");
        assert_eq!(value(&env, "KAFKA_BOOTSTRAP"), "kafka:9092");
        assert_eq!(value(&env, "DEMO_ROLE"), "pharmacy");
        assert!(c.pdb.is_some());
        assert!(desired_consumer(&cr, 1).unwrap().pdb.is_none());
        let pod = c.deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.automount_service_account_token,
            Some(false),
            "consumers need no API access"
        );
        assert_eq!(
            selector_string(&selector_labels("consumer", "pharmacy")),
            "app.kubernetes.io/instance=pharmacy,app.kubernetes.io/name=outbox-consumer"
        );
    }

    #[test]
    fn bad_consumer_specs_name_the_field() {
        let e = desired_consumer(
            &group(
                json!({"topics": [{"name": "a", "partitions": 1}, {"name": "a", "partitions": 2}]}),
            ),
            1,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.topics[1].name");
        assert!(e.reason.contains("listed twice"));
        let e = desired_consumer(
            &group(json!({"env": [{"name": "X", "value": "1"}, {"name": "KAFKA_BOOTSTRAP", "value": "evil:1"}]})),
            1,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.env[1].name: KAFKA_BOOTSTRAP is set by the operator from the spec"
        );
        let e = desired_consumer(&group(json!({"image": ""})), 1).unwrap_err();
        assert_eq!(e.field, "spec.image");
    }

    #[test]
    fn a_shared_topic_is_held_by_other_groups_on_the_same_kafka_only() {
        let mine = group(json!({"topics": [
            {"name": "orders", "partitions": 6, "deletionPolicy": "Delete"},
            {"name": "scratch", "partitions": 1, "deletionPolicy": "Delete"},
            {"name": "kept", "partitions": 1}]}));
        let mut same = group(
            json!({"topics": [{"name": "orders", "partitions": 6}, {"name": "kept", "partitions": 1}]}),
        );
        same.metadata.name = Some("billing".into());
        same.metadata.namespace = Some("finance".into());
        let mut elsewhere = group(
            json!({"kafka": {"bootstrap": "other:9092"}, "topics": [{"name": "scratch", "partitions": 1}]}),
        );
        elsewhere.metadata.name = Some("lab".into());
        let held = topics_held_by_others(&mine, &[mine.clone(), same, elsewhere]);
        assert_eq!(
            held,
            BTreeMap::from([("orders".to_string(), vec!["finance/billing".to_string()])]),
            "itself, Retain topics and another cluster's topic of the same name do not count"
        );
    }

    #[test]
    fn templates_cannot_replace_what_the_operator_sets() {
        let t = |v: serde_json::Value| serde_json::from_value::<Template>(v).unwrap();
        let env = consumer_env(&group(json!({})));
        let field = |v| {
            validate_template(Some(&t(v)), "consumer", &env)
                .unwrap_err()
                .field
        };
        assert_eq!(
            field(json!({"pod": {"metadata": {"annotations": {"outbox.dev/secret-hash": "x"}}}})),
            "spec.template.pod.metadata.annotations[outbox.dev/secret-hash]"
        );
        assert_eq!(
            field(json!({"pod": {"volumes": [{"name": "outbox-secrets", "emptyDir": {}}]}})),
            "spec.template.pod.volumes[0].name"
        );
        assert_eq!(
            field(json!({"container": {"volumeMounts": [{"name": "nope", "mountPath": "/data"}]}})),
            "spec.template.container.volumeMounts[0].name"
        );
        assert_eq!(
            field(json!({"container": {"env": [{"name": "KAFKA_BOOTSTRAP", "value": "evil:1"}]}})),
            "spec.template.container.env[0].name"
        );
        assert!(validate_template(
            Some(&t(json!({"pod": {"serviceAccountName": "wi"}}))),
            "consumer",
            &env
        )
        .is_ok());
        assert_eq!(
            validate_template(
                Some(&t(json!({"pod": {"serviceAccountName": "wi"}}))),
                "relay",
                &env
            )
            .unwrap_err()
            .field,
            "spec.template.pod.serviceAccountName"
        );
    }

    #[test]
    fn the_pause_annotation_must_say_true() {
        let mut cr = group(json!({}));
        assert!(!is_paused(&cr));
        cr.metadata.annotations =
            Some(BTreeMap::from([(PAUSED_ANNOTATION.into(), "false".into())]));
        assert!(!is_paused(&cr));
        cr.metadata.annotations = Some(BTreeMap::from([(PAUSED_ANNOTATION.into(), "true".into())]));
        assert!(is_paused(&cr));
    }
}
