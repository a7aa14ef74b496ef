//! The generated CRDs: up to date in `crds/`, the names and subresources users rely on, and every CEL
//! rule evaluated client-side.

use operator::crd::{crd_files, ConsumerGroup, OutboxRelay};
use serde_json::json;

#[test]
fn crds_in_the_repository_match_the_generator() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, want) in crd_files() {
        let have = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            have == want,
            "crds/{name} is stale: run `cargo run -p operator --bin crdgen`"
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        crd_files().len(),
        "crds/ holds files the generator does not write"
    );
}

#[test]
fn names_scale_subresource_and_columns() {
    use kube::CustomResourceExt;
    let cg = serde_json::to_value(ConsumerGroup::crd()).unwrap();
    assert_eq!(cg["spec"]["names"]["shortNames"], json!(["cg"]));
    assert_eq!(cg["spec"]["names"]["categories"], json!(["outbox"]));
    let v = &cg["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(
        v["subresources"]["scale"],
        json!({"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"})
    );
    assert_eq!(v["subresources"]["status"], json!({}));
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        ["Replicas", "Desired", "Ready", "Partitions", "Lag", "Age"]
    );
    let obr = serde_json::to_value(OutboxRelay::crd()).unwrap();
    assert_eq!(obr["spec"]["names"]["shortNames"], json!(["obr"]));
    let cols: Vec<&str> = obr["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Ready", "Leader", "Backlog", "Age"]);
    // Secrets are referenced, never inlined: no field of the relay spec is called password or url, but
    // for `passwordSecret.password`, which (as in Strimzi) names the key in the Secret.
    let mut spec =
        obr["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
    let auth = &mut spec["properties"]["kafka"]["properties"]["authentication"]["properties"];
    let key = auth["passwordSecret"]["properties"]["password"]["description"].clone();
    assert!(
        key.as_str()
            .unwrap()
            .starts_with("Key of the password in the Secret"),
        "{key}"
    );
    auth["passwordSecret"] = json!({});
    let spec = spec.to_string();
    assert!(
        !spec.contains("\"password\"") && !spec.contains("\"url\":{"),
        "{spec}"
    );
}

fn relay(coordination: serde_json::Value) -> OutboxRelay {
    contract::fixtures::relay("orders", json!({ "coordination": coordination }))
}

#[test]
fn lease_timings_must_nest() {
    assert!(relay(json!({})).validate_cel().is_ok(), "defaults 15/10/2");
    let bad = relay(json!({"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}));
    let err = format!("{:?}", bad.validate_cel().unwrap_err());
    assert!(
        err.contains("lease duration must exceed the renew deadline"),
        "{err}"
    );
    let bad = relay(json!({"renewDeadlineSeconds": 2, "retryPeriodSeconds": 2}));
    assert!(bad.validate_cel().is_err());
}

/// Group `pharmacy` with `group_id` and `topics` (name, partitions).
fn group(group_id: &str, topics: &[(&str, i32)]) -> ConsumerGroup {
    let spec = contract::fixtures::group_spec(group_id, json!({ "topics": topic_list(topics) }));
    ConsumerGroup::new("pharmacy", serde_json::from_value(spec).unwrap())
}

fn topic_list(topics: &[(&str, i32)]) -> Vec<serde_json::Value> {
    topics
        .iter()
        .map(|(n, p)| json!({"name": n, "partitions": p}))
        .collect()
}

#[test]
fn group_id_is_immutable_topics_stay_and_partitions_never_decrease() {
    let old = group("pharmacy", &[("orders", 6)]);
    assert!(old.validate_cel().is_ok());
    assert!(group("pharmacy", &[("orders", 12), ("returns", 3)])
        .validate_cel_update(&old)
        .is_ok());
    let errors = |new: ConsumerGroup| format!("{:?}", new.validate_cel_update(&old).unwrap_err());
    assert!(errors(group("pharmacy-2", &[("orders", 6)])).contains("groupId is immutable"));
    assert!(errors(group("pharmacy", &[("orders", 3)])).contains("partitions never decrease"));
    assert!(errors(group("pharmacy", &[("returns", 6)])).contains("topics cannot be removed"));
}

#[test]
fn the_examples_parse_and_pass_the_cel_rules() {
    let read = |f: &str| contract::fixtures::example(f);
    let relay: OutboxRelay = serde_json::from_value(read("outboxrelay.yaml")).unwrap();
    relay.validate_cel().unwrap();
    assert_eq!(relay.spec.replicas, 2);
    let secured: OutboxRelay =
        serde_json::from_value(read("outboxrelay-strimzi-scram.yaml")).unwrap();
    secured.validate_cel().unwrap();
    operator::plan::validate_relay(&secured).unwrap();
    for f in [
        "consumergroup-pharmacy.yaml",
        "consumergroup-notification.yaml",
        "consumergroup-mtls.yaml",
    ] {
        let g: ConsumerGroup = serde_json::from_value(read(f)).unwrap();
        operator::plan::validate_consumer(&g).unwrap();
        g.validate_cel().unwrap();
        assert_eq!(g.spec.topics[0].name, "orders", "{f}");
    }
}
