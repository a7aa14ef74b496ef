//! What ships to Kubernetes, checked as far as a machine without Docker, helm or an API server allows:
//! the chart's CRDs are the generated ones, values.yaml obeys values.schema.json (and bad values are
//! refused with a message), the examples are valid resources, the operator's objects survive a round trip
//! through the Kubernetes API types without losing a field, and the Dockerfile builds exactly the
//! workspace's deployable binaries under the image names the chart uses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use operator::crd::{crd_files, ConsumerGroup, OutboxRelay};
use operator::plan::{desired_consumer, desired_relay, Defaults};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).unwrap()
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    for (name, generated) in crd_files() {
        assert_eq!(
            read(&format!("charts/outbox-operator/crds/{name}")),
            generated,
            "charts/outbox-operator/crds/{name} is stale: run `cargo run -p operator --bin crdgen`"
        );
        assert_eq!(read(&format!("crds/{name}")), generated);
    }
}

fn values_validator() -> jsonschema::Validator {
    let schema: Value =
        serde_json::from_str(&read("charts/outbox-operator/values.schema.json")).unwrap();
    jsonschema::validator_for(&schema).expect("values.schema.json is a valid JSON Schema")
}

fn errors(v: &jsonschema::Validator, values: &Value) -> Vec<String> {
    v.iter_errors(values)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect()
}

#[test]
fn values_yaml_obeys_its_schema_and_bad_values_are_refused() {
    let v = values_validator();
    let values = yaml(&read("charts/outbox-operator/values.yaml"));
    assert_eq!(errors(&v, &values), Vec::<String>::new());
    let mut demo = values.clone();
    demo["demo"]["enabled"] = json!(true);
    demo["demo"]["kafkaUi"]["enabled"] = json!(true);
    assert!(v.is_valid(&demo));

    let bad = |path: &[&str], value: Value| {
        let mut x = values.clone();
        let mut cur = &mut x;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[path[path.len() - 1]] = value;
        errors(&v, &x)
    };
    let e = bad(&["demo", "api", "nodePort"], json!(8080));
    assert!(
        e.iter()
            .any(|m| m.contains("/demo/api/nodePort") && m.contains("30000")),
        "{e:?}"
    );
    let e = bad(&["image", "pullPolicy"], json!("Sometimes"));
    assert!(e.iter().any(|m| m.contains("/image/pullPolicy")), "{e:?}");
    let e = bad(&["operator", "replicas"], json!(2));
    assert!(e.iter().any(|m| m.contains("/operator/replicas")), "{e:?}");
    let e = bad(&["demo", "postgres", "password"], json!("short"));
    assert!(
        e.iter().any(|m| m.contains("/demo/postgres/password")),
        "{e:?}"
    );
    let e = bad(&["demo", "relay", "replicas"], json!(0));
    assert!(!e.is_empty());
    let e = bad(&["operator", "logFormt"], json!("json"));
    assert!(
        e.iter().any(|m| m.contains("logFormt")),
        "a typo is refused: {e:?}"
    );
}

/// Every field of `original` is still in `round_tripped` (nothing unknown was dropped).
fn missing_fields(original: &Value, round_tripped: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => missing_fields(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                match b.get(i) {
                    Some(w) => missing_fields(v, w, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

fn round_trip<K: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Vec<String> {
    let typed: K = serde_json::from_value(doc.clone()).expect("deserializes");
    let back = serde_json::to_value(&typed).unwrap();
    let mut out = Vec::new();
    missing_fields(doc, &back, "", &mut out);
    out
}

fn crd_schema(kind: &str) -> jsonschema::Validator {
    let file = crd_files()
        .into_iter()
        .find(|(n, _)| n.starts_with(&format!("{}s.", kind.to_lowercase())))
        .unwrap()
        .1;
    let crd = yaml(&file);
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn the_examples_are_valid_resources() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let doc = yaml(&std::fs::read_to_string(&path).unwrap());
        let kind = doc["kind"].as_str().unwrap().to_owned();
        let schema = crd_schema(&kind);
        assert_eq!(
            errors(&schema, &doc),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        let dropped = match kind.as_str() {
            "OutboxRelay" => round_trip::<OutboxRelay>(&doc),
            "ConsumerGroup" => round_trip::<ConsumerGroup>(&doc),
            other => panic!("unexpected kind {other}"),
        };
        assert!(
            dropped.is_empty(),
            "{}: unknown fields {dropped:?}",
            path.display()
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
    // And the schema does refuse things: a relay without kafka.
    let bad = json!({"apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "x"},
        "spec": {"database": {"secretRef": {"name": "db", "key": "url"}}}});
    assert!(!crd_schema("OutboxRelay").is_valid(&bad));
}

#[test]
fn the_operators_objects_survive_the_kubernetes_api_types() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    fn check<K: serde::de::DeserializeOwned + serde::Serialize>(obj: &K) {
        let v = serde_json::to_value(obj).unwrap();
        assert!(v["apiVersion"].is_string() && v["kind"].is_string(), "{v}");
        assert_eq!(round_trip::<K>(&v), Vec::<String>::new());
    }
    let relay: OutboxRelay = serde_norway::from_str(&read("examples/outboxrelay.yaml")).unwrap();
    let c = desired_relay(
        &relay,
        &Defaults {
            relay_image: "r:1".into(),
        },
    )
    .unwrap();
    check::<ServiceAccount>(&c.service_account);
    check::<Role>(&c.role);
    check::<RoleBinding>(&c.role_binding);
    check::<Deployment>(&c.deployment);
    check::<Service>(&c.service);
    check::<PodDisruptionBudget>(c.pdb.as_ref().unwrap());
    let group: ConsumerGroup =
        serde_norway::from_str(&read("examples/consumergroup-pharmacy.yaml")).unwrap();
    let g = desired_consumer(&group, 2).unwrap();
    check::<Deployment>(&g.deployment);
    check::<Service>(&g.service);
    check::<PodDisruptionBudget>(g.pdb.as_ref().unwrap());
}

#[test]
fn the_dockerfile_builds_the_deployable_binaries_under_the_charts_image_names() {
    let dockerfile = read("Dockerfile");
    let built: BTreeSet<String> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_owned())
        .collect();
    let targets: BTreeSet<String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM runtime AS "))
        .map(|t| t.trim().to_owned())
        .collect();
    // The workspace's binaries, as cargo sees them.
    let meta = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let meta: Value = serde_json::from_slice(&meta.stdout).unwrap();
    let workspace: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    let deployable: BTreeSet<String> = [
        "outbox-operator",
        "outbox-relay",
        "demo-consumer",
        "demo-api",
    ]
    .map(String::from)
    .into();
    assert!(deployable.is_subset(&workspace), "{workspace:?}");
    assert_eq!(built, deployable, "cargo build --bin … in the Dockerfile");
    assert_eq!(targets, deployable, "one image target per binary");
    for t in &deployable {
        assert!(
            dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{t}\"]")),
            "{t} runs its own binary"
        );
    }
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "non-root numeric user"
    );
    let makefile = read("Makefile");
    assert!(makefile.contains("IMAGES := outbox-operator outbox-relay demo-consumer demo-api"));
    // Every image the chart names is one the Dockerfile builds.
    let mut named = BTreeSet::new();
    for entry in walk(&root().join("charts/outbox-operator/templates")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        for sep in ["(list . \"", "(list $ \""] {
            for part in text.split(sep).skip(1) {
                if let Some(name) = part.split('"').next() {
                    named.insert(name.to_owned());
                }
            }
        }
    }
    assert!(!named.is_empty());
    assert!(named.is_subset(&deployable), "{named:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
