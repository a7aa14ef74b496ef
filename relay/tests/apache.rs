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

/// The seed-003 topology: three brokers, replication factor 3, `min.insync.replicas=2`. The leader of a
/// partition is SIGKILLed while the relay publishes: nothing is lost, each key keeps its order, nothing is
/// dead-lettered. With two brokers down the relay holds (not enough replicas: the broker's fault, no attempt
/// counted) and drains once one returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_lose_nothing_when_leaders_die_and_hold_without_enough_replicas() {
    let cluster = apache::KafkaCluster::start(&apache::Options {
        nodes: 3,
        ..apache::Options::default()
    })
    .expect("start Apache Kafka");
    eprintln!("three nodes ready in {:.1?}", cluster.started_in());
    cluster
        .create_topic(TOPIC, 4, 3, &[("min.insync.replicas", "2")])
        .await
        .unwrap();
    let db = migrated_db().await;
    let mut k = kafka(cluster.bootstrap());
    k.delivery_timeout = Duration::from_secs(5);
    let r = in_process(&db.pool, config(), k);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = spawn_run(r.relay.clone(), shutdown.clone());

    insert_events(&db.pool, 20, 2_000, 0).await;
    test_support::wait_for("some published", Duration::from_secs(60), || async {
        (count(&db.pool, "outbox.events").await < 1_500).then_some(())
    })
    .await;
    let leader = cluster.leader(TOPIC, 0).unwrap();
    cluster.kill(leader).unwrap();
    insert_events(&db.pool, 20, 1_000, 100).await;
    test_support::wait_for(
        "drained with a leader dead",
        Duration::from_secs(90),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;

    // Two of three down: acks=all cannot be met on any partition whose replicas include them.
    let others: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    cluster.kill(others[0]).unwrap();
    insert_events(&db.pool, 20, 200, 200).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let pending = count(&db.pool, "outbox.events").await;
    assert!(pending > 0, "nothing can be acknowledged by one broker");
    assert_eq!(count(&db.pool, "outbox.dead").await, 0, "nothing dead");
    cluster.restart(leader).unwrap();
    test_support::wait_for(
        "drained once a second broker is back",
        Duration::from_secs(120),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;
    shutdown.cancel();
    run.await.unwrap();
    cluster.restart(others[0]).unwrap();
    assert_eq!(count(&db.pool, "outbox.dead").await, 0, "nothing dead");
    let ledger = check_order(&read(&cluster.bootstrap(), TOPIC));
    assert_eq!(ledger.distinct, 3_200, "every event on the topic");
}
