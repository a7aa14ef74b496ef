//! A member that a real broker (tansu) leaves without partitions after a killed member comes back within
//! its session timeout: the runtime notices and replaces its Kafka client.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{effects_db, produce_events, Record};
use consumer_runtime::metrics::Metrics;
use consumer_runtime::{RetryPolicy, Runtime, RuntimeConfig};
use outbox::SchemaName;
use test_support::kafka::Tansu;
use test_support::wait_for;
use tokio_util::sync::CancellationToken;

const GROUP: &str = "notification";

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The demo consumer as the first member of the group.
fn first_member(url: &str, brokers: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_demo-consumer"))
        .args(["--role", GROUP, "--database-url", url, "--brokers", brokers])
        .args(["--session-timeout", "6s", "--instance-id", "first"])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_left_without_partitions_by_a_dead_leader_gets_a_new_kafka_client() {
    let tansu = Tansu::start().unwrap();
    tansu.create_topic("orders", 2).await.unwrap();
    let db = effects_db().await;

    let port = test_support::free_port();
    let mut first = first_member(&db.url, &tansu.bootstrap(), port);
    wait_for(
        "the first member owns both partitions",
        Duration::from_secs(60),
        || async {
            get(port, "/readyz")
                .filter(|b| b.contains("\"assigned_partitions\":2"))
                .map(|_| ())
        },
    )
    .await;
    // Killed: it never leaves the group; the next member joins within its session timeout.
    first.kill().unwrap();
    first.wait().unwrap();
    // Joining 4 s later (within the dead member's 6 s session) makes tansu 0.6 form the next generation
    // around the dead member as leader: nobody computes the assignment, the newcomer settles with none.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut cfg = RuntimeConfig::new(GROUP, vec!["orders".into()], tansu.bootstrap());
    cfg.inbox_schema = SchemaName::new("inbox").unwrap();
    cfg.session_timeout = Duration::from_secs(6);
    cfg.rejoin_timeout = Duration::from_secs(8);
    cfg.retry = RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
    };
    let metrics = Arc::new(Metrics::default());
    let rt = Runtime::new(cfg, db.pool.clone(), Record, metrics.clone()).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { rt.run(s).await.unwrap() });

    produce_events(&tansu.bootstrap(), "orders", &["a", "b", "c", "d"]).await;
    // On a timeout, say how far the member got: restarts, partitions, events handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while metrics.processed.get() != 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 90 s the second member handled {} of 4 events with {} client restarts and {} partitions",
            metrics.processed.get(),
            metrics.client_restarts.get(),
            metrics.assigned_partitions.get()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At least one new client, once the group's offsets stood still for a rejoin timeout (tansu may
    // strand the next one too while the dead member is still in its books).
    assert!(metrics.client_restarts.get() >= 1);
    assert_eq!(metrics.assigned_partitions.get(), 2);
    stop.cancel();
    task.await.unwrap();
    let effects: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(effects, 4);
}
