//! What relay and consumer pods share: object metadata and owner references, environment helpers, probes,
//! the restricted security contexts, the pod template with the user's `spec.template` added (never
//! replacing), the Deployment, metrics Service and PodDisruptionBudget around it, and the Secret keys a
//! connection reads.

use super::*;

pub(super) fn owner<K: Resource<DynamicType = ()>>(cr: &K) -> Vec<OwnerReference> {
    cr.controller_owner_ref(&()).into_iter().collect()
}

pub(super) fn meta<K: Resource<DynamicType = ()>>(
    cr: &K,
    name: &str,
    component: &str,
) -> ObjectMeta {
    let instance = cr.meta().name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name.into()),
        namespace: cr.meta().namespace.clone(),
        labels: Some(labels(component, &instance)),
        owner_references: Some(owner(cr)),
        ..Default::default()
    }
}

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

pub(super) fn env_secret(name: &str, s: &SecretKeyRef) -> EnvVar {
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

pub(super) fn env_field(name: &str, path: &str) -> EnvVar {
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

pub(super) fn kafka_env(kafka: &KafkaSpec, config_var: &str) -> Vec<EnvVar> {
    let mut v = vec![env(common::KAFKA_BOOTSTRAP, kafka.bootstrap.clone())];
    if let Some(s) = &kafka.config_secret_ref {
        v.push(env_secret(config_var, s));
    }
    v.extend(connection::kafka_env(kafka));
    v
}

pub(super) fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
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
pub(super) fn pod_template(
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

pub(super) fn deployment(
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

pub(super) fn metrics_service(meta: ObjectMeta, selector: BTreeMap<String, String>) -> Service {
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

pub(super) fn pdb(meta: ObjectMeta, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
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
pub(super) fn check_env_overrides(user: &[EnvVar], managed: &[EnvVar]) -> Result<(), SpecError> {
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

pub(super) fn by_env(field: &str, r: &SecretKeyRef) -> SecretUse {
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
