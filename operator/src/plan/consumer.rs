//! The children of a ConsumerGroup: the Deployment of the user's consumer image with the runtime's
//! environment, the metrics Service and (with replicas) a PDB; and which of its topics other groups still
//! hold when it is deleted.

use contract::env::consumer;

use super::*;

/// The Secret keys a consumer pod mounts.
pub fn consumer_files(cr: &ConsumerGroup) -> Vec<SecretUse> {
    let mut f = connection::kafka_files(&cr.spec.kafka);
    f.extend(connection::database_files(cr.spec.database.tls.as_ref()));
    f
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

pub(super) fn consumer_env(cr: &ConsumerGroup) -> Vec<EnvVar> {
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
