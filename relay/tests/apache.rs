//! The `outbox-relay` binary against Apache Kafka 4.4 (one KRaft node shared by this binary): it publishes
//! over SASL_SSL with SCRAM-SHA-512 as a Strimzi `KafkaUser` would, in key order; with a wrong password it
//! keeps the events pending, dead-letters nothing and says why in its log.

mod common;

use std::time::Duration;

use common::*;
use test_support::apache;

fn sasl_args(dir: &std::path::Path, password: &str) -> Vec<String> {
    let cluster = apache::shared(1);
    let password_file = dir.join("password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    vec![
        "--kafka-ca-file".into(),
        cluster.ca_path().display().to_string(),
        "--kafka-sasl-mechanism".into(),
        "scram-sha-512".into(),
        "--kafka-sasl-username".into(),
        "relay".into(),
        "--kafka-sasl-password-file".into(),
        password_file.display().to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_over_scram_sha_512_in_key_order() {
    let cluster = apache::shared(1);
    cluster.create_topic(TOPIC, 4, 1, &[]).await.unwrap();
    let db = migrated_db().await;
    insert_events(&db.pool, 10, 300, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let args = sasl_args(dir.path(), "relay-secret");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn_binary(
        &db.url,
        &cluster.sasl_ssl_bootstrap(),
        test_support::free_port(),
        &args,
    );
    test_support::wait_for("drained", Duration::from_secs(60), || async {
        (count(&db.pool, "outbox.events").await == 0).then_some(())
    })
    .await;
    sigkill(&mut child);
    let ledger = check_order(&read(&cluster.bootstrap(), TOPIC));
    assert_eq!((ledger.distinct, ledger.duplicates), (300, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_events_pending_and_says_why() {
    let cluster = apache::shared(1);
    let db = migrated_db().await;
    insert_events(&db.pool, 5, 50, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let args = sasl_args(dir.path(), "wrong");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn_binary(
        &db.url,
        &cluster.sasl_ssl_bootstrap(),
        test_support::free_port(),
        &args,
    );
    let stderr = still_running_after(child, Duration::from_secs(8)).await;
    assert_eq!(count(&db.pool, "outbox.events").await, 50, "all pending");
    assert_eq!(count(&db.pool, "outbox.dead").await, 0, "nothing dead");
    assert!(
        stderr.contains("SASL authentication error") && stderr.contains("invalid credentials"),
        "the log says the broker refused the login: {stderr}"
    );
}
