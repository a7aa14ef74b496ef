//! The `outbox-relay` binary as a process: SIGKILL mid-stream, single-mode failover, SIGTERM, startup.

mod common;

use std::time::{Duration, Instant};

use common::*;
use test_support::kafka::mock_cluster;
use test_support::{free_port, wait_for};

async fn published(port: u16) -> Option<f64> {
    let (_, m) = http_get(port, "/metrics").await?;
    Some(metric(&m, "outbox_relay_published_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_duplicates_stay_within_the_batches_in_flight() {
    let db = migrated_db().await;
    let mock = mock_cluster(3, &[(TOPIC, 6)]);
    insert_events(&db.pool, 100, 10_000, 0).await;
    let batch = 200;
    let args = ["--batch-size", "200", "--linger", "20ms"];

    let port = free_port();
    let mut first = spawn_binary(&db.url, &mock.bootstrap_servers(), port, &args);
    wait_for(
        "the relay to be mid-stream",
        Duration::from_secs(60),
        || async {
            let left = count(&db.pool, "outbox.events").await;
            (left < 8_000).then_some(())
        },
    )
    .await;
    sigkill(&mut first);
    let left_at_kill = count(&db.pool, "outbox.events").await;
    assert!(left_at_kill > 0, "killed before the end");

    let port = free_port();
    let mut second = spawn_binary(&db.url, &mock.bootstrap_servers(), port, &args);
    wait_for(
        "the restarted relay to drain the outbox",
        Duration::from_secs(120),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    println!(
        "SIGKILL with {left_at_kill} events pending: {} records, {} distinct, {} duplicates",
        ledger.records, ledger.distinct, ledger.duplicates
    );
    assert_eq!(ledger.distinct, 10_000, "nothing lost");
    // The default pipeline keeps eight batches awaiting acknowledgments plus one committing while the next
    // is claimed: all nine may be published again (README, Guarantees: depth + 1 batches).
    let in_flight = 8 + 1;
    assert!(
        ledger.duplicates <= batch * in_flight,
        "duplicates ({}) come only from the unsettled batches",
        ledger.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_single_mode_relays_exactly_one_publishes_and_the_other_takes_over() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    let args = ["--coordination", "single", "--lock-retry", "200ms"];
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_binary(&db.url, &mock.bootstrap_servers(), port_a, &args);
    wait_for("relay A ready", Duration::from_secs(30), || async {
        http_get(port_a, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let args_b = [&args[..], &["--instance-id", "relay-b"]].concat();
    let mut b = spawn_binary(&db.url, &mock.bootstrap_servers(), port_b, &args_b);
    let (_, body) = wait_for("relay B standing by", Duration::from_secs(30), || async {
        http_get(port_b, "/readyz")
            .await
            .filter(|(s, b)| *s == 503 && b.contains("standby"))
    })
    .await;
    assert!(body.contains("advisory lock"), "readiness says why: {body}");

    insert_events(&db.pool, 10, 1_000, 0).await;
    wait_for("first 1000 published", Duration::from_secs(30), || async {
        (count(&db.pool, "outbox.events").await == 0).then_some(())
    })
    .await;
    wait_for(
        "A's metrics to show all 1000",
        Duration::from_secs(10),
        || async { (published(port_a).await? == 1000.0).then_some(()) },
    )
    .await;
    assert_eq!(
        published(port_b).await,
        Some(0.0),
        "the standby published nothing"
    );

    sigkill(&mut a);
    let killed = Instant::now();
    insert_events(&db.pool, 10, 1_000, 100).await;
    wait_for(
        "B to take over and drain",
        Duration::from_secs(30),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;
    println!(
        "single-mode failover: backlog drained {:?} after SIGKILL of the leader",
        killed.elapsed()
    );
    assert_eq!(published(port_b).await, Some(1000.0));
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM outbox.fence WHERE scope = 'default'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(epoch, 2, "each acquisition bumps the fencing epoch");
    let holder: String =
        sqlx::query_scalar("SELECT holder FROM outbox.fence WHERE scope = 'default'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(holder, "relay-b", "--instance-id names the fence holder");
    b.kill().unwrap();
    b.wait().unwrap();

    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_and_exits_zero() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 2)]);
    let port = free_port();
    let mut relay = spawn_binary(&db.url, &mock.bootstrap_servers(), port, &[]);
    wait_for("ready", Duration::from_secs(30), || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    insert_events(&db.pool, 5, 2_000, 0).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let err = stderr_of(&mut relay);
    assert!(err.contains("stopped cleanly"), "{err}");
    // Whatever was claimed was settled: everything in Kafka left the outbox, no more, no less.
    let delivered = read(&mock.bootstrap_servers(), TOPIC).len() as i64;
    assert_eq!(delivered + count(&db.pool, "outbox.events").await, 2_000);
}

#[test]
fn bad_settings_exit_2_with_one_line_naming_the_setting() {
    let cases = [
        (
            vec![("DATABASE_URL", "mysql://nope"), ("KAFKA_BOOTSTRAP", "a:1")],
            "invalid --database-url (DATABASE_URL)",
        ),
        (
            vec![
                ("DATABASE_URL", "postgres://127.0.0.1:1/x"),
                ("KAFKA_BOOTSTRAP", "no-port"),
            ],
            "invalid --brokers (KAFKA_BOOTSTRAP)",
        ),
        (
            vec![("KAFKA_BOOTSTRAP", "a:1")],
            "invalid --database-url (DATABASE_URL): is required",
        ),
        (
            vec![
                ("DATABASE_URL", "postgres://h/x"),
                ("KAFKA_BOOTSTRAP", "a:1"),
                ("OUTBOX_SCHEMA", "Bad"),
            ],
            "invalid --schema (OUTBOX_SCHEMA)",
        ),
    ];
    for (env, want) in cases {
        test_support::cli::assert_refused(
            env!("CARGO_BIN_EXE_outbox-relay"),
            &["run", "--http-addr", "127.0.0.1:0"],
            &env,
            &["DATABASE_URL", "KAFKA_BOOTSTRAP"],
            &format!("outbox-relay: {want}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_at_startup_is_retried_with_one_line_per_attempt() {
    let dead_port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{dead_port}/x");
    let relay = spawn_binary(&url, "127.0.0.1:1", free_port(), &[]);
    let err = still_running_after(relay, Duration::from_secs(3)).await;
    let attempts: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("database unreachable (attempt"))
        .collect();
    assert!(attempts.len() >= 2, "{err}");
    assert!(
        attempts[0].contains("attempt 1") && attempts[1].contains("attempt 2"),
        "{attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_startup_is_retried_and_migrate_and_dead_list_work() {
    let db = test_support::pg::fresh_db().await;
    let bin = env!("CARGO_BIN_EXE_outbox-relay");
    let out = std::process::Command::new(bin)
        .args(["migrate", "--notify-trigger", "false"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "schema `outbox` is up to date (notify trigger: off)"
    );
    sqlx::query(
        "INSERT INTO outbox.dead (id, event_id, topic, key, payload, headers, created_at, attempts, reason, error, parked) \
         VALUES (1, gen_random_uuid(), 'orders', 'k', '', '{}', now(), 3, 'max_attempts', 'timed out', true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["dead", "list", "--json"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            row["key"].as_str(),
            row["reason"].as_str(),
            row["parked"].as_bool()
        ),
        (Some("k"), Some("max_attempts"), Some(true))
    );
    let out = std::process::Command::new(bin)
        .args(["dead", "redrive"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "redrive without a selector is refused"
    );

    let relay = spawn_binary(
        &db.url,
        &format!("127.0.0.1:{}", free_port()),
        free_port(),
        &["--log-format", "json"],
    );
    let err = still_running_after(relay, Duration::from_secs(5)).await;
    let first = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("kafka unreachable (attempt 1)"))
        });
    let first =
        first.unwrap_or_else(|| panic!("no JSON log line for the first broker attempt: {err}"));
    assert_eq!(first["level"], "WARN");
}
