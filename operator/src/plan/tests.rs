//! The planners' unit tests.
use super::*;
use serde_json::json;

/// The fixture relay `shop/orders`, its Kafka settings also from a Secret.
fn relay(spec: serde_json::Value) -> OutboxRelay {
    let mut overrides = json!({"kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "kafka", "key": "props"}}});
    overrides
        .as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    let mut cr = contract::fixtures::relay("orders", overrides);
    cr.metadata.namespace = Some("shop".into());
    cr.metadata.uid = Some("uid-1".into());
    cr
}

/// The fixture group `shop/pharmacy`.
fn group(spec: serde_json::Value) -> ConsumerGroup {
    let mut cr = contract::fixtures::group("pharmacy", spec);
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
        let path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone();
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
        &relay(json!({"coordination": {"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}})),
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
        &group(json!({"topics": [{"name": "a", "partitions": 1}, {"name": "a", "partitions": 2}]})),
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
    cr.metadata.annotations = Some(BTreeMap::from([(PAUSED_ANNOTATION.into(), "false".into())]));
    assert!(!is_paused(&cr));
    cr.metadata.annotations = Some(BTreeMap::from([(PAUSED_ANNOTATION.into(), "true".into())]));
    assert!(is_paused(&cr));
}
