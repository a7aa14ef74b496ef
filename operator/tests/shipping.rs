//! What ships to Kubernetes, the Rust side: the chart's CRDs are the generated ones, the examples lose no
//! field through the CRD types, and the Dockerfile builds exactly the workspace's deployable binaries under
//! the image names the chart uses. Rendering the chart, the values schema and validation against the
//! Kubernetes schemas are `make check-manifests` (scripts/check-manifests.py, with Helm's own library).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use operator::crd::{crd_files, ConsumerGroup, OutboxRelay};
use serde_json::Value;

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
            read(&format!("charts/outbox-operator-crds/files/crds/{name}")),
            generated,
            "charts/outbox-operator-crds/files/crds/{name} is stale: run `cargo run -p operator --bin crdgen`"
        );
        assert_eq!(read(&format!("crds/{name}")), generated);
    }
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

#[test]
fn the_examples_lose_no_field_through_the_crd_types() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let doc = yaml(&std::fs::read_to_string(&path).unwrap());
        let kind = doc["kind"].as_str().unwrap().to_owned();
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
    assert_eq!(seen, 5, "every file of examples/");
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
