//! The alert rules (charts/outbox-operator/rules/outbox.rules.yaml) name only metrics the processes really
//! export: read from the `/metrics` of a running stack (API, relay, both consumer groups) and the operator's
//! registry.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::ledger::ledger;
use e2e::load::post_orders;
use e2e::stack::{Options, Stack};

/// Metric names in a Prometheus text exposition: every sample's name, and for each `# TYPE` its name (plus
/// `_total` for counters, which have no sample until a label set exists).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "counter" {
                    names.insert(format!("{name}_total"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// `outbox_*` identifiers in the rules' expressions.
fn used_by_rules() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/outbox-operator/rules/outbox.rules.yaml");
    let rules: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("outbox_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_use_is_exported() {
    let mut stack = Stack::start(Options {
        pharmacy: 1,
        notification: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    post_orders(&stack.api, 20, 4, false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ledger(&stack.pool).await.unwrap().complete() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "orders not delivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Consumers publish lag per owned partition every 2 s; wait for the first round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !stack
        .metrics("pharmacy-1")
        .await
        .unwrap()
        .contains("outbox_consumer_lag{")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lag series from pharmacy-1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut names = BTreeSet::new();
    for process in ["relay", "pharmacy-1", "notification-1", "api"] {
        names.extend(exported(&stack.metrics(process).await.unwrap()));
    }
    // The operator's families appear once they hold a series (as after its first reconciles).
    let operator = operator::metrics::Metrics::default();
    let resource = operator::metrics::ResourceLabel {
        kind: "ConsumerGroup".into(),
        namespace: "shop".into(),
        name: "pharmacy".into(),
    };
    operator.record_state(resource.clone(), true, false);
    operator.record_backlog(resource, Some(0), Some(0.0));
    operator
        .failures
        .get_or_create(&operator::metrics::FailureLabel {
            kind: "ConsumerGroup".into(),
            reason: "KafkaError".into(),
        })
        .inc();
    names.extend(exported(&operator.render()));
    let used = used_by_rules();
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the alert rules use metrics no process exports: {missing:?}\nexported: {names:?}"
    );
    stack.stop().await;
}
