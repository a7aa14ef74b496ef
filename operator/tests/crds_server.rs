//! The generated CRDs on a real kube-apiserver: accepted (inside the CEL cost budget) and Established,
//! the examples accepted, every CEL rule refused by the server with its message, valid updates accepted.

mod common;

use contract::fixtures;
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator::crd::{ConsumerGroup, OutboxRelay};
use serde_json::{json, Value};
use test_support::control_plane;

/// Server-side apply as a user (`kubectl apply --server-side`) would.
async fn apply<K>(api: &Api<K>, object: &Value) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply("crd-test").force(),
        &Patch::Apply(object),
    )
    .await
}

/// The refusal's message, or a panic when the server accepted the object.
fn refused<K: std::fmt::Debug>(result: Result<K, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message.clone()
        }
        other => panic!("the API server accepted what it should refuse: {other:?}"),
    }
}

#[tokio::test]
async fn both_crds_are_accepted_and_established() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    let established = common::install_crds(&client).await;
    assert_eq!(
        established,
        ["consumergroups.outbox.dev", "outboxrelays.outbox.dev"]
    );
    // The chart's copies are the same files (the staleness test), so `helm install` sends these too.
}

#[tokio::test]
async fn the_examples_are_accepted() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("examples").await;
    let relays = Api::<OutboxRelay>::namespaced(client.clone(), &ns);
    let relay = apply(&relays, &fixtures::example("outboxrelay.yaml"))
        .await
        .unwrap();
    assert_eq!(relay.spec.coordination.lease_duration_seconds, 15);
    let secured = apply(
        &relays,
        &fixtures::example("outboxrelay-strimzi-scram.yaml"),
    )
    .await
    .unwrap();
    assert!(secured.spec.kafka.authentication.is_some());
    let groups = Api::<ConsumerGroup>::namespaced(client, &ns);
    for file in [
        "consumergroup-pharmacy.yaml",
        "consumergroup-notification.yaml",
        "consumergroup-mtls.yaml",
    ] {
        let g = apply(&groups, &fixtures::example(file)).await.unwrap();
        assert_eq!(g.spec.topics[0].name, "orders", "{file}");
    }
}

/// OutboxRelay `name` as a user writes it, with `coordination`.
fn relay(name: &str, coordination: Value) -> Value {
    let spec = fixtures::relay_spec(json!({ "coordination": coordination }));
    fixtures::object("OutboxRelay", name, spec)
}

#[tokio::test]
async fn lease_timings_must_nest() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("lease-timings").await;
    let api = Api::<OutboxRelay>::namespaced(client, &ns);
    apply(&api, &relay("defaults", json!({}))).await.unwrap();
    let message = refused(
        apply(
            &api,
            &relay(
                "equal",
                json!({"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}),
            ),
        )
        .await,
    );
    assert!(
        message.contains("lease duration must exceed the renew deadline"),
        "{message}"
    );
    assert!(message.contains("spec.coordination"), "{message}");
    refused(
        apply(
            &api,
            &relay(
                "retry",
                json!({"renewDeadlineSeconds": 2, "retryPeriodSeconds": 2}),
            ),
        )
        .await,
    );
}

/// ConsumerGroup `pharmacy` as a user writes it, with `group_id`, two replicas and `topics` (name,
/// partitions).
fn group(group_id: &str, topics: &[(&str, i32)]) -> Value {
    let topics: Vec<Value> = topics
        .iter()
        .map(|(n, p)| json!({"name": n, "partitions": p}))
        .collect();
    let spec = fixtures::group_spec(group_id, json!({"replicas": 2, "topics": topics}));
    fixtures::object("ConsumerGroup", "pharmacy", spec)
}

#[tokio::test]
async fn group_id_is_immutable_topics_stay_and_partitions_never_decrease() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("cel-rules").await;
    let api = Api::<ConsumerGroup>::namespaced(client, &ns);
    apply(&api, &group("pharmacy", &[("orders", 6)]))
        .await
        .unwrap();

    let message = refused(apply(&api, &group("pharmacy-2", &[("orders", 6)])).await);
    assert!(message.contains("groupId is immutable"), "{message}");
    assert!(message.contains("spec.groupId"), "{message}");
    let message = refused(apply(&api, &group("pharmacy", &[("orders", 3)])).await);
    assert!(message.contains("partitions never decrease"), "{message}");
    assert!(message.contains("spec.topics[0]"), "{message}");
    let message = refused(apply(&api, &group("pharmacy", &[("returns", 6)])).await);
    assert!(
        message.contains("topics cannot be removed or renamed"),
        "{message}"
    );

    // More partitions and a new topic: accepted, and kept.
    let updated = apply(&api, &group("pharmacy", &[("orders", 12), ("returns", 3)]))
        .await
        .unwrap();
    let topics: Vec<(String, i32)> = updated
        .spec
        .topics
        .iter()
        .map(|t| (t.name.clone(), t.partitions))
        .collect();
    assert_eq!(topics, [("orders".into(), 12), ("returns".into(), 3)]);
    // The new topic is under the rules too, from its first update on.
    let message = refused(apply(&api, &group("pharmacy", &[("orders", 12), ("returns", 1)])).await);
    assert!(message.contains("partitions never decrease"), "{message}");
}

#[tokio::test]
async fn bad_fields_are_refused_naming_the_field() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("bad-fields").await;
    let api = Api::<ConsumerGroup>::namespaced(client, &ns);
    let cases = [
        (
            "/spec/topics/0/name",
            json!("orders topic"),
            "spec.topics[0].name",
        ),
        (
            "/spec/topics/0/partitions",
            json!(0),
            "spec.topics[0].partitions",
        ),
        (
            "/spec/database/secretRef/name",
            json!(""),
            "spec.database.secretRef.name",
        ),
        (
            "/spec/kafka/configSecretRef",
            json!({"name": "kafka", "key": "bad key"}),
            "spec.kafka.configSecretRef.key",
        ),
        ("/spec/replicas", json!(-1), "spec.replicas"),
    ];
    for (pointer, value, field) in cases {
        let mut object = group("pharmacy", &[("orders", 6)]);
        let (parent, leaf) = pointer.rsplit_once('/').unwrap();
        object.pointer_mut(parent).unwrap()[leaf] = value;
        let create = serde_json::from_value::<ConsumerGroup>(object).unwrap();
        let message = refused(api.create(&PostParams::default(), &create).await);
        assert!(message.contains(field), "{pointer}: {message}");
    }
    // Two topics of one name: the list is keyed by name. (Server-side apply of the same object fails with a
    // 500 "duplicate entries for key" — the API server's error, not a validation message.)
    let twice =
        serde_json::from_value::<ConsumerGroup>(group("pharmacy", &[("orders", 6), ("orders", 3)]))
            .unwrap();
    let message = refused(api.create(&PostParams::default(), &twice).await);
    assert!(
        message.contains("spec.topics[1]") && message.contains("Duplicate value"),
        "{message}"
    );
}

#[tokio::test]
async fn bad_autoscaling_is_refused_naming_the_field() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("bad-autoscaling").await;
    let api = Api::<ConsumerGroup>::namespaced(client, &ns);
    let with = |autoscaling: Value| {
        let mut g = group("pharmacy", &[("orders", 6)]);
        g["spec"]["autoscaling"] = autoscaling;
        g
    };
    let message = refused(
        apply(
            &api,
            &with(json!({"minReplicas": 4, "maxReplicas": 2, "lagPerReplica": 100})),
        )
        .await,
    );
    assert!(
        message.contains("spec.autoscaling")
            && message.contains("minReplicas must not exceed maxReplicas"),
        "{message}"
    );
    for (bad, field) in [
        (
            json!({"maxReplicas": 0, "lagPerReplica": 100}),
            "spec.autoscaling.maxReplicas",
        ),
        (
            json!({"maxReplicas": 3, "lagPerReplica": 0}),
            "spec.autoscaling.lagPerReplica",
        ),
        (json!({"maxReplicas": 3}), "spec.autoscaling.lagPerReplica"),
        (
            json!({"maxReplicas": 3, "lagPerReplica": 10, "scaleDownStabilizationSeconds": 86400}),
            "spec.autoscaling.scaleDownStabilizationSeconds",
        ),
    ] {
        let message = refused(apply(&api, &with(bad.clone())).await);
        assert!(message.contains(field), "{bad}: {message}");
    }
    // A valid one is accepted with its defaults filled in.
    let g = apply(
        &api,
        &with(json!({"maxReplicas": 6, "lagPerReplica": 1000})),
    )
    .await
    .unwrap();
    let a = g.spec.autoscaling.unwrap();
    assert_eq!(
        (
            a.min_replicas,
            a.activation_lag,
            a.scale_up_stabilization_seconds,
            a.scale_down_stabilization_seconds,
            a.poll_interval_seconds
        ),
        (0, 1, 0, 300, 15)
    );
}

#[tokio::test]
async fn kafka_security_settings_that_cannot_work_are_refused_by_the_server() {
    let plane = control_plane::shared();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("kafka-security").await;
    let relays = Api::<OutboxRelay>::namespaced(client.clone(), &ns);
    let groups = Api::<ConsumerGroup>::namespaced(client, &ns);
    let with = |kafka: Value| {
        let mut r = relay("orders", json!({}));
        r["spec"]["kafka"] = kafka;
        r
    };
    let password = json!({"secretName": "shop", "password": "password"});
    let cert = json!({"secretName": "shop", "certificate": "user.crt", "key": "user.key"});
    for (kafka, message) in [
        (
            json!({"bootstrap": "k:9093", "tls": {}, "authentication": {"type": "tls"}}),
            "type tls needs certificateAndKey",
        ),
        (
            json!({"bootstrap": "k:9093", "authentication": {"type": "scram-sha-512", "username": "shop"}}),
            "SASL types (scram-sha-256, scram-sha-512, plain) need username and passwordSecret",
        ),
        (
            json!({"bootstrap": "k:9093", "authentication": {"type": "plain", "username": "u",
                "passwordSecret": password, "certificateAndKey": cert}}),
            "certificateAndKey belongs to type tls",
        ),
        (
            json!({"bootstrap": "k:9093", "authentication": {"type": "tls", "certificateAndKey": cert}}),
            "authentication type tls needs kafka.tls",
        ),
        (
            json!({"bootstrap": "k:9093", "authentication": {"type": "kerberos"}}),
            "spec.kafka.authentication.type",
        ),
    ] {
        let m = refused(apply(&relays, &with(kafka.clone())).await);
        assert!(
            m.contains(message) && m.contains("spec.kafka"),
            "{kafka}: {m}"
        );
    }
    // Strimzi's shapes are accepted: TLS + SCRAM, and mutual TLS.
    let r = apply(
        &relays,
        &with(json!({"bootstrap": "my-cluster-kafka-bootstrap:9093",
            "tls": {"trustedCertificates": [{"secretName": "my-cluster-cluster-ca-cert", "certificate": "ca.crt"}]},
            "authentication": {"type": "scram-sha-512", "username": "shop", "passwordSecret": password}})),
    )
    .await
    .unwrap();
    assert_eq!(
        r.spec.kafka.authentication.unwrap().username.as_deref(),
        Some("shop")
    );
    let mut g = group("pharmacy", &[("orders", 6)]);
    g["spec"]["kafka"] = json!({"bootstrap": "k:9093", "tls": {},
        "authentication": {"type": "tls", "certificateAndKey": cert}});
    g["spec"]["database"]["tls"] = json!({"caSecretRef": {"name": "pg-ca", "key": "ca.crt"}});
    let g = apply(&groups, &g).await.unwrap();
    assert!(g.spec.database.tls.is_some());
}

/// The README's install command, `kubectl apply -f crds/` (client-side apply), works: the CRDs with the
/// embedded core/v1 schemas (affinity, volumes, ...) stay under the 256 KiB annotation limit it writes.
#[tokio::test]
async fn kubectl_apply_installs_the_generated_crds() {
    let plane = control_plane::shared();
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let out = plane
        .kubectl(&["apply", "-f", crds.to_str().unwrap()])
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("consumergroups.outbox.dev"), "{said}");
}
