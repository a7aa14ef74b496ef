//! Minimal valid custom resources for tests (feature `fixtures`): one place that knows what a spec needs,
//! so a new required field changes one file. `overrides` are merged over the spec's top level.

use serde_json::{json, Value};

use crate::crd::{ConsumerGroup, OutboxRelay};

fn merged(mut base: Value, overrides: Value) -> Value {
    let extra = overrides
        .as_object()
        .expect("overrides are a JSON object")
        .clone();
    base.as_object_mut().expect("an object").extend(extra);
    base
}

/// An `OutboxRelay` spec: database URL from Secret `orders-db` key `url`, bootstrap `kafka:9092`.
pub fn relay_spec(overrides: Value) -> Value {
    merged(
        json!({
            "database": {"secretRef": {"name": "orders-db", "key": "url"}},
            "kafka": {"bootstrap": "kafka:9092"},
        }),
        overrides,
    )
}

/// A `ConsumerGroup` spec for group `group_id`: image `demo-consumer:1`, topic `orders` with 6 partitions,
/// database and bootstrap as in [`relay_spec`].
pub fn group_spec(group_id: &str, overrides: Value) -> Value {
    merged(
        json!({
            "groupId": group_id, "image": "demo-consumer:1",
            "kafka": {"bootstrap": "kafka:9092"},
            "database": {"secretRef": {"name": "orders-db", "key": "url"}},
            "topics": [{"name": "orders", "partitions": 6}],
        }),
        overrides,
    )
}

/// OutboxRelay `name` with [`relay_spec`]`(overrides)`.
pub fn relay(name: &str, overrides: Value) -> OutboxRelay {
    let spec = serde_json::from_value(relay_spec(overrides)).expect("a valid OutboxRelay spec");
    OutboxRelay::new(name, spec)
}

/// ConsumerGroup `name` (also its group id) with [`group_spec`]`(name, overrides)`.
pub fn group(name: &str, overrides: Value) -> ConsumerGroup {
    let spec =
        serde_json::from_value(group_spec(name, overrides)).expect("a valid ConsumerGroup spec");
    ConsumerGroup::new(name, spec)
}

/// `spec` as a whole object of `kind` named `name`, untyped: for sending to an API server exactly what a
/// user would write (no defaults filled in by serialization).
pub fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": crate::crd::API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// The directory of the repository's example resources (`examples/`), which users apply as they are.
fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Example `file` of `examples/`, parsed from YAML.
pub fn example(file: &str) -> Value {
    let path = examples_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every example of `examples/`, parsed, in file name order.
pub fn examples() -> Vec<Value> {
    let mut files: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples/")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    files.iter().map(|f| example(f)).collect()
}
