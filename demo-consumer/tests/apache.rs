//! The consumer runtime against Apache Kafka 4.4 (one KRaft node shared by this binary): it consumes over
//! SASL_SSL with SCRAM-SHA-512, and the `demo-consumer` binary with a wrong password keeps running, handles
//! nothing and says why in its log.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{effects_db, produce_events, Record};
use consumer_runtime::metrics::Metrics;
use consumer_runtime::{Runtime, RuntimeConfig};
use outbox::SchemaName;
use test_support::apache;
use tokio_util::sync::CancellationToken;

fn scram(password: &str) -> Vec<(String, String)> {
    let cluster = apache::shared(1);
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "consumer"),
        ("sasl.password", password),
        ("ssl.ca.pem", cluster.ca_pem()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_consumes_over_scram_sha_512() {
    let cluster = apache::shared(1);
    cluster.create_topic("receipts", 2, 1, &[]).await.unwrap();
    let db = effects_db().await;
    let mut cfg = RuntimeConfig::new(
        "receipts-group",
        vec!["receipts".into()],
        cluster.sasl_ssl_bootstrap(),
    );
    cfg.inbox_schema = SchemaName::new("inbox").unwrap();
    cfg.kafka_extra = scram("consumer-secret");
    let metrics = Arc::new(Metrics::default());
    let rt = Runtime::new(cfg, db.pool.clone(), Record, metrics.clone()).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { rt.run(s).await.unwrap() });

    produce_events(&cluster.bootstrap(), "receipts", &["a", "b", "c", "d"]).await;
    test_support::wait_for("four records handled", Duration::from_secs(60), || async {
        (metrics.processed.get() == 4).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(effects, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_the_consumer_running_and_says_why() {
    let cluster = apache::shared(1);
    let db = test_support::pg::fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "wrong\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo-consumer"))
        .args(["--role", "notification", "--database-url", &db.url])
        .args(["--brokers", &cluster.sasl_ssl_bootstrap()])
        .arg("--kafka-ca-file")
        .arg(cluster.ca_path())
        .args(["--kafka-sasl-mechanism", "scram-sha-512"])
        .args(["--kafka-sasl-username", "consumer"])
        .arg("--kafka-sasl-password-file")
        .arg(&password)
        .args([
            "--http-addr",
            &format!("127.0.0.1:{}", test_support::free_port()),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "a refused login is retried, not a crash"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("SASL authentication error") && stderr.contains("invalid credentials"),
        "the log says the broker refused the login: {stderr}"
    );
}
