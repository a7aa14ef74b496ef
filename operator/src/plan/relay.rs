//! The children of an OutboxRelay: ServiceAccount, Role and RoleBinding for its Lease and status, the
//! Deployment of relays with their environment, the metrics Service and (with replicas) a PDB.

use contract::env::relay;

use super::*;

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

pub(super) fn seconds(s: i32) -> String {
    format!("{s}s")
}

/// The relay's environment, from the spec.
pub(super) fn relay_env(cr: &OutboxRelay) -> Vec<EnvVar> {
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
