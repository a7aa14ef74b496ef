//! End-to-end: real processes (demo-api, outbox-relay, demo-consumer ×3) against a real PostgreSQL and a
//! Kafka-protocol broker, with crashes. The ledger checks every order has exactly one effect per group.
//! Scenarios run one at a time: each starts a whole stack, and the machine has two cores.

use std::time::Duration;

use e2e::ledger::{ledger, orphan_effects, topic_history, Ledger};
use e2e::load::post_orders;
use e2e::stack::{Options, Stack, ORDERS_TOPIC};
use serde_json::{json, Value};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn settle(stack: &Stack, timeout: Duration) -> Ledger {
    stack.settle(timeout).await
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_orders_have_exactly_one_effect_per_group_and_receipts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(Options::default()).await.unwrap();
    let ids = post_orders(&stack.api, 5000, 16, false).await.unwrap();
    assert_eq!(ids.len(), 5000);
    let l = settle(&stack, Duration::from_secs(120)).await;
    assert_eq!(l.orders, 5000);
    assert_eq!(orphan_effects(&stack.pool).await.unwrap(), 0);
    // The topic itself: every event the outbox wrote, each key in commit order.
    let history = topic_history(&stack.pool, &stack.bootstrap).await.unwrap();
    assert!(history.holds(), "{}", history.summary());
    assert_eq!(history.delivered, 5000, "{}", history.summary());

    // The receipt of one order's event: written, published (partition/offset), consumed by both groups.
    let order: Value = reqwest::get(format!("{}/orders/{}", stack.api, ids[42]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let receipt_url = format!("{}{}", stack.api, order["receipt"].as_str().unwrap());
    let receipt = test_support::wait_for("both receipts", Duration::from_secs(10), || async {
        let r: Value = reqwest::get(&receipt_url).await.ok()?.json().await.ok()?;
        (r["consumed_by"].as_array()?.len() == 2).then_some(r)
    })
    .await;
    assert_eq!(receipt["status"], "published", "{receipt}");
    assert_eq!(receipt["published"]["topic"], ORDERS_TOPIC);
    assert!(receipt["published"]["offset"].as_i64().is_some());
    let mut groups: Vec<&str> = receipt["consumed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["group"].as_str().unwrap())
        .collect();
    groups.sort();
    assert_eq!(groups, ["notification", "pharmacy"]);
    assert_eq!(
        receipt["consumed_by"][0]["partition"],
        receipt["published"]["partition"]
    );

    // Lag per partition is exported and drains to zero.
    let text = test_support::wait_for("lag drained", Duration::from_secs(20), || async {
        let t = stack.metrics("notification-1").await.ok()?;
        let lag = test_support::metric_value(&t, "outbox_consumer_lag");
        (t.contains("outbox_consumer_lag{") && lag == 0.0).then_some(t)
    })
    .await;
    assert!(text.contains(r#"topic="orders""#), "{text}");
    for (name, status) in stack.stop().await {
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not stop cleanly: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pharmacy_consumer_hands_its_partitions_over_without_double_effects() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(Options::default()).await.unwrap();
    let api = stack.api.clone();
    let load = tokio::spawn(async move { post_orders(&api, 3000, 8, false).await });
    test_support::wait_for("pharmacy mid-stream", Duration::from_secs(60), || async {
        (count(
            &stack,
            "SELECT count(*) FROM inbox.inbox WHERE group_id = 'pharmacy'",
        )
        .await
            > 300)
            .then_some(())
    })
    .await;
    stack.kill("pharmacy-1").await.unwrap();
    load.await.unwrap().unwrap();
    let l = settle(&stack, Duration::from_secs(120)).await;
    assert_eq!(l.orders, 3000);
    // The survivor owns every partition now.
    stack
        .wait_assigned("pharmacy-2", 6, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM inbox.inbox WHERE group_id = 'pharmacy'"
        )
        .await,
        3000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_republishes_and_the_inbox_absorbs_the_duplicates() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(Options::default()).await.unwrap();
    let api = stack.api.clone();
    let load = tokio::spawn(async move { post_orders(&api, 3000, 8, false).await });
    test_support::wait_for("relay mid-stream", Duration::from_secs(60), || async {
        (count(&stack, "SELECT count(*) FROM outbox.archive").await > 300).then_some(())
    })
    .await;
    stack.kill("relay").await.unwrap();
    let pending = count(&stack, "SELECT count(*) FROM outbox.events").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.restart("relay").await.unwrap();
    load.await.unwrap().unwrap();
    let l = settle(&stack, Duration::from_secs(120)).await;
    assert_eq!(l.orders, 3000);
    let published = count(&stack, "SELECT count(*) FROM outbox.archive").await;
    assert!(published >= 3000);
    let crash_duplicates = published - 3000;
    // Copies from the crash are allowed; a key out of order or an event missing is not.
    let history = topic_history(&stack.pool, &stack.bootstrap).await.unwrap();
    assert!(history.holds(), "{}", history.summary());

    // However the kill fell, make Kafka hold a second copy of every event: replay the archive (what an
    // operator does after an incident). Each group must skip all of them.
    let out = tokio::process::Command::new(e2e::bins::bin("outbox-relay").unwrap())
        .args([
            "replay",
            "--since",
            "2000-01-01T00:00:00Z",
            "--brokers",
            &stack.bootstrap,
        ])
        .env("DATABASE_URL", &stack.database_url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = (published + crash_duplicates) as f64;
    for group in ["pharmacy", "notification"] {
        test_support::wait_for(
            "replayed copies skipped",
            Duration::from_secs(60),
            || async {
                let skipped = stack
                    .metric_sum(group, "outbox_consumer_duplicates_skipped_total")
                    .await;
                (skipped >= want).then_some(())
            },
        )
        .await;
    }
    let l = ledger(&stack.pool).await.unwrap();
    assert!(l.complete() && l.no_duplicates(), "{l:?}");
    println!(
        "relay killed with {pending} events pending; {crash_duplicates} duplicates from the crash, \
         {published} replayed; every group skipped them all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_api_crashed_right_after_the_commit_is_delivered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(Options {
        allow_crash: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/orders?crash=after-commit", stack.api))
        .json(&json!({"customer": "crash", "items": [{"sku": "x", "quantity": 1}]}))
        .send()
        .await;
    assert!(r.is_err(), "the API answered instead of crashing: {r:?}");
    let status = stack.procs.get_mut("api").unwrap().wait().await.unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "the API exits right after the commit"
    );
    assert_eq!(count(&stack, "SELECT count(*) FROM shop.orders").await, 1);
    let l = settle(&stack, Duration::from_secs(60)).await;
    assert_eq!(l.orders, 1);
    assert_eq!(l.pharmacy.exactly_once, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_goes_to_the_dlq_with_its_reason_and_the_rest_flow() {
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start(Options::default()).await.unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/messages", stack.api))
        .json(&json!({"topic": "orders", "key": "poison", "event_type": "OrderCreated", "payload": {"poison": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // Bad input to the running API: the documented 4xx, nothing written.
    for (body, status) in [
        (json!({"customer": "a", "items": []}), 422),
        (json!({"items": [{"sku": "a", "quantity": 1}]}), 422),
    ] {
        let r = http
            .post(format!("{}/orders", stack.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let answer: Value = r.json().await.unwrap();
        assert!(answer["field"].is_string(), "{answer}");
    }
    post_orders(&stack.api, 200, 8, false).await.unwrap();
    let l = settle(&stack, Duration::from_secs(60)).await;
    assert_eq!(l.orders, 200, "bad input wrote no order");

    let bootstrap = stack.bootstrap.clone();
    let dlq = test_support::wait_for("both groups dead-lettered", Duration::from_secs(30), || {
        let b = bootstrap.clone();
        async move {
            let records = tokio::task::spawn_blocking(move || {
                test_support::kafka::read_topic(&b, "orders.dlq")
            })
            .await
            .ok()?
            .ok()?;
            (records.len() == 2).then_some(records)
        }
    })
    .await;
    let mut groups: Vec<&str> = dlq
        .iter()
        .map(|r| r.headers["dlq.group"].as_str())
        .collect();
    groups.sort();
    assert_eq!(groups, ["notification", "pharmacy"]);
    for r in &dlq {
        assert!(
            r.headers["dlq.reason"].contains("missing field `order_id`"),
            "{:?}",
            r.headers
        );
        assert_eq!(r.key.as_deref(), Some("poison"));
    }
    assert_eq!(orphan_effects(&stack.pool).await.unwrap(), 0);
    assert_eq!(
        stack
            .metric_sum("pharmacy", "outbox_consumer_dead_lettered_total")
            .await,
        1.0
    );
}
