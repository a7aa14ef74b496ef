//! Monitoring against real processes: the alert rules (charts/outbox-operator/rules/outbox.rules.yaml) and
//! the Grafana dashboard (charts/outbox-operator/dashboards/outbox.json) name only metrics the processes
//! really export (read from the `/metrics` of a running stack and the operator's registry), and a real
//! Prometheus fires and resolves the alerts.

use std::collections::BTreeSet;
use std::time::Duration;

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

/// `outbox_*` identifiers in a PromQL expression.
fn outbox_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("outbox_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        into.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
}

fn chart_file(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/outbox-operator")
            .join(path),
    )
    .unwrap()
}

/// Metrics the alert rules' expressions name.
fn used_by_rules() -> BTreeSet<String> {
    let rules: serde_json::Value =
        serde_norway::from_str(&chart_file("rules/outbox.rules.yaml")).unwrap();
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            outbox_names(rule["expr"].as_str().unwrap(), &mut names);
        }
    }
    names
}

/// Metrics the dashboard's panel queries name (and its template variables).
fn used_by_dashboard() -> BTreeSet<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&chart_file("dashboards/outbox.json")).unwrap();
    let mut names = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            outbox_names(t["expr"].as_str().unwrap(), &mut names);
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            outbox_names(q, &mut names);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let mut stack = Stack::start(Options {
        pharmacy: 1,
        notification: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    post_orders(&stack.api, 20, 4, false).await.unwrap();
    stack.settle(Duration::from_secs(60)).await;
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
        .reconciles
        .get_or_create(&operator::metrics::KindLabel {
            kind: "ConsumerGroup".into(),
        })
        .inc();
    operator
        .failures
        .get_or_create(&operator::metrics::FailureLabel {
            kind: "ConsumerGroup".into(),
            reason: "KafkaError".into(),
        })
        .inc();
    names.extend(exported(&operator.render()));
    for (what, used) in [
        ("alert rules", used_by_rules()),
        ("dashboard", used_by_dashboard()),
    ] {
        assert!(used.len() >= 10, "{what}: {used:?}");
        let missing: Vec<&String> = used.iter().filter(|n| !names.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "the {what} use metrics no process exports: {missing:?}\nexported: {names:?}"
        );
    }
    stack.stop().await;
}

/// Names of the alerts Prometheus has firing now.
async fn firing(prometheus: &str) -> BTreeSet<String> {
    let Ok(r) = reqwest::get(format!("{prometheus}/api/v1/alerts")).await else {
        return BTreeSet::new();
    };
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    body["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
        .collect()
}

async fn wait_alerts(
    prometheus: &test_support::prometheus::Prometheus,
    what: &str,
    want: impl Fn(&BTreeSet<String>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = firing(&prometheus.url()).await;
        if want(&now) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: firing {now:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A real Prometheus (Debian's package) scrapes the stack and evaluates the chart's rules, with each `for:`
/// shortened to 2 s so the test does not wait minutes (the expressions are the file's). A dead event and a
/// stopped relay fire `OutboxDeadEvents` and `OutboxNoActivePublisher`; discarding the event and restarting
/// the relay resolves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_and_resolves_the_alerts() {
    let mut stack = Stack::start(Options {
        pharmacy: 1,
        notification: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    // A relay that dead-letters records over 4 KiB before sending them.
    stack.kill("relay").await.unwrap();
    let mut spec = stack.relay_spec().unwrap();
    spec.args
        .extend(["--max-message-bytes".into(), "4096".into()]);
    let relay_port = spec.http_port;
    stack.spawn(spec).unwrap();
    stack
        .wait_ready(&["relay"], Duration::from_secs(60))
        .await
        .unwrap();
    let port = |name: &str| stack.procs[name].spec.http_port;
    let target = |port: u16, name: &str, instance: &str| {
        format!(
            "  - job_name: {instance}-{port}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n        labels: {{namespace: demo, app_kubernetes_io_name: {name}, app_kubernetes_io_instance: {instance}}}\n"
        )
    };
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yaml]\nscrape_configs:\n{}{}{}",
        target(relay_port, "outbox-relay", "orders"),
        target(port("pharmacy-1"), "outbox-consumer", "pharmacy"),
        target(port("notification-1"), "outbox-consumer", "notification"),
    );
    let rules_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/outbox-operator/rules/outbox.rules.yaml");
    let rules: String = std::fs::read_to_string(rules_path)
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                format!("{}for: 2s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let prometheus = tokio::task::spawn_blocking(move || {
        test_support::prometheus::Prometheus::start(&config, &[("rules.yaml", &rules)])
    })
    .await
    .unwrap()
    .unwrap();
    // Healthy: scraped, evaluated, nothing of ours firing.
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up: serde_json::Value = http
            .get(format!("{}/api/v1/query", prometheus.url()))
            .query(&[("query", "sum(up)")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if up["data"]["result"][0]["value"][1] == "3" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "targets not up: {up}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let quiet = firing(&prometheus.url()).await;
    assert!(
        !quiet.contains("OutboxDeadEvents") && !quiet.contains("OutboxNoActivePublisher"),
        "{quiet:?}"
    );

    // A record too large for the relay: dead-lettered.
    let r: serde_json::Value = http
        .post(format!("{}/messages", stack.api))
        .json(
            &serde_json::json!({"topic": "orders", "key": "big", "event_type": "Blob",
            "payload": {"blob": "x".repeat(10_000)}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let event_id = r["event_id"].as_str().unwrap().to_string();
    wait_alerts(&prometheus, "OutboxDeadEvents firing", |a| {
        a.contains("OutboxDeadEvents")
    })
    .await;
    // The relay stops: no publisher.
    stack.kill("relay").await.unwrap();
    wait_alerts(&prometheus, "OutboxNoActivePublisher firing", |a| {
        a.contains("OutboxNoActivePublisher")
    })
    .await;

    // Recovery: the relay is back (same port) and the dead event discarded.
    stack.restart("relay").await.unwrap();
    let out = tokio::process::Command::new(e2e::bins::bin("outbox-relay").unwrap())
        .args(["dead", "discard", "--event-id", &event_id])
        .env("DATABASE_URL", &stack.database_url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_alerts(&prometheus, "both resolved", |a| {
        !a.contains("OutboxDeadEvents") && !a.contains("OutboxNoActivePublisher")
    })
    .await;
    stack.stop().await;
}
