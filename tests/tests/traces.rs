//! Traces from commit to effect: with the standard OTel variables set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`), the demo API, the relay and both consumer groups export spans to
//! an OTLP/HTTP collector (in this test, on loopback). One order's trace runs from the API's request span
//! (whose context the event's `traceparent` stores) to each group's handler span; the relay's batch span
//! links to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use e2e::stack::{Options, Stack};
use serde_json::Value;

/// (service.name, span) for every span the collector received.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn collector() -> (u16, Received) {
    let received: Received = Arc::default();
    let r = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let r = r.clone();
            async move {
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                for rs in req["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or_default()
                        .to_string();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for span in ss["spans"].as_array().into_iter().flatten() {
                            r.lock().unwrap().push((service.clone(), span.clone()));
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_api_request_to_each_groups_handler() {
    let (port, received) = collector().await;
    let env = |k: &str, v: String| (k.to_string(), v);
    let mut stack = Stack::start(Options {
        pharmacy: 1,
        notification: 1,
        extra_env: vec![
            env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".into()),
            env("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
        ..Options::default()
    })
    .await
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/orders", stack.api))
        .json(&serde_json::json!({"customer": "traced", "items": [{"sku": "aspirin", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    let spans = |service: &str, name: &str| -> Vec<Value> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, span)| s == service && span["name"] == name)
            .map(|(_, span)| span.clone())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (request, handlers, batches, runs) = loop {
        let request = spans("demo-api", "POST /orders");
        let handlers = spans("demo-consumer", "consumer.handle");
        let batches = spans("outbox-relay", "relay.batch");
        let runs = spans("demo-consumer", "consumer.run");
        if request.len() == 1 && handlers.len() >= 2 && !batches.is_empty() && runs.len() >= 2 {
            break (request, handlers, batches, runs);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "api log:\n{}\nspans received: {:?}",
            stack.procs["api"].logs().join("\n"),
            received
                .lock()
                .unwrap()
                .iter()
                .map(|(s, span)| format!("{s}: {}", span["name"]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let trace = request[0]["traceId"].as_str().unwrap().to_string();
    let request_span = request[0]["spanId"].as_str().unwrap().to_string();
    assert!(!trace.is_empty());
    // Both groups' handler spans are children of the API's request span, in its trace.
    let groups: Vec<String> = handlers
        .iter()
        .filter(|h| h["traceId"] == trace.as_str())
        .map(|h| {
            assert_eq!(h["parentSpanId"], request_span.as_str(), "{h}");
            h["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "group")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let mut groups = groups;
    groups.sort();
    assert_eq!(groups, ["notification", "pharmacy"], "{handlers:?}");
    // Each consumer run (a partition's records in one go) says which group and partition it is about.
    let attribute = |span: &Value, key: &str| {
        span["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == key)
            .map(|a| a["value"].clone())
    };
    for run in &runs {
        assert!(attribute(run, "group").is_some(), "{run}");
        assert!(attribute(run, "partition").is_some(), "{run}");
    }
    // The relay's batch that carried the event links to the request's trace.
    assert!(
        batches.iter().any(|b| b["links"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["traceId"] == trace.as_str() && l["spanId"] == request_span.as_str())),
        "no relay batch links to {trace}: {batches:?}"
    );
    stack.stop().await;
}
