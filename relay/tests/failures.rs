//! Non-retriable events, the dead table, DLQ, archive retention and replay.

mod common;

use common::*;
use outbox::SchemaName;
use relay::decide::PoisonPolicy;
use relay::store::Retention;
use relay::tools::{self, DeadSelector, ReplayFilter};
use test_support::kafka::mock_cluster;

/// key-a: small, OVERSIZED, small, small; key-b: three small.
async fn insert_with_poison(pool: &sqlx::PgPool) {
    insert_raw(
        pool,
        &[
            ("key-a", 10, 0),
            ("key-b", 10, 0),
            ("key-a", 20_000, 1),
            ("key-b", 10, 1),
            ("key-a", 10, 2),
            ("key-a", 10, 3),
            ("key-b", 10, 2),
        ],
    )
    .await;
}

/// Inserts (key, padding, seq) rows with payload `<padding spaces>key:seq`, raw, as a writer with a larger
/// limit (or plain SQL) could.
async fn insert_raw(pool: &sqlx::PgPool, rows: &[(&str, usize, u32)]) {
    for &(key, size, seq) in rows {
        let payload = format!("{}{key}:{seq}", " ".repeat(size));
        sqlx::query("INSERT INTO outbox.events (event_id, topic, key, payload) VALUES (gen_random_uuid(), $1, $2, $3)")
            .bind(TOPIC)
            .bind(key)
            .bind(payload.into_bytes())
            .execute(pool)
            .await
            .unwrap();
    }
}

fn small_limit(poison: PoisonPolicy) -> relay::RelayConfig {
    let mut cfg = config();
    cfg.max_message_bytes = 10_000;
    cfg.retry.poison = poison;
    cfg.dlq = true;
    cfg
}

/// The poison scenario, drained once by a relay with a 10 kB limit, DLQ on, and `poison` policy.
async fn poisoned_and_drained(
    poison: PoisonPolicy,
) -> (
    test_support::pg::TestDb,
    test_support::kafka::Mock,
    InProcess,
) {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3), ("orders.dlq", 1)]);
    insert_with_poison(&db.pool).await;
    let r = in_process(
        &db.pool,
        small_limit(poison),
        kafka(mock.bootstrap_servers()),
    );
    drain(&r.relay).await;
    (db, mock, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_dead_lettered_and_parks_only_its_key() {
    let (db, mock, r) = poisoned_and_drained(PoisonPolicy::ParkKey).await;

    let dead = tools::dead_list(
        &db.pool,
        &SchemaName::default(),
        &DeadSelector::default(),
        10,
    )
    .await
    .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].key.as_str(),
            dead[0].reason.as_str(),
            dead[0].parked
        ),
        ("key-a", "too_large", true)
    );
    assert!(
        dead[0].error.contains("message.max.bytes=10000"),
        "{}",
        dead[0].error
    );
    let waiting: Vec<String> = sqlx::query_scalar("SELECT key FROM outbox.events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        waiting,
        ["key-a", "key-a"],
        "key-a's later events wait behind the dead one"
    );

    let delivered = read(&mock.bootstrap_servers(), TOPIC);
    assert_eq!(delivered.len(), 4, "key-a:0 and key-b's three");
    assert_eq!(
        delivered
            .iter()
            .filter(|r| r.key.as_deref() == Some("key-b"))
            .count(),
        3,
        "other keys unaffected"
    );

    // The copy goes out after the batch committed, outside its transaction.
    assert_eq!(r.relay.send_due_dlq().await.unwrap(), 1);
    let dlq = read(&mock.bootstrap_servers(), "orders.dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].headers["outbox.reason"], "too_large");
    assert_eq!(dlq[0].headers["event_id"], dead[0].event_id.to_string());
    assert!(
        dlq[0].payload.is_empty(),
        "an oversized payload is not copied to the DLQ"
    );
    assert_eq!(
        metric(&r.metrics.render(), "outbox_relay_dead_lettered_total"),
        1.0
    );

    // Discarding the poison event unparks the key; its later events flow in order.
    let n = tools::dead_discard(
        &db.pool,
        &SchemaName::default(),
        &DeadSelector::key("key-a"),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    drain(&r.relay).await;
    assert_eq!(count(&db.pool, "outbox.events").await, 0);
    let all = read(&mock.bootstrap_servers(), TOPIC);
    assert_eq!(all.len(), 6);
    check_order(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_policy_lets_the_key_continue() {
    let (db, mock, _relay) = poisoned_and_drained(PoisonPolicy::Skip).await;
    assert_eq!(count(&db.pool, "outbox.events").await, 0);
    let dead = tools::dead_list(
        &db.pool,
        &SchemaName::default(),
        &DeadSelector::default(),
        10,
    )
    .await
    .unwrap();
    assert_eq!((dead.len(), dead[0].parked), (1, false));
    let delivered = read(&mock.bootstrap_servers(), TOPIC);
    assert_eq!(
        delivered
            .iter()
            .filter(|r| r.key.as_deref() == Some("key-a"))
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_puts_the_event_back_before_later_events_of_its_key() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3)]);
    insert_with_poison(&db.pool).await;
    let mut cfg = small_limit(PoisonPolicy::ParkKey);
    cfg.dlq = false;
    drain(&in_process(&db.pool, cfg, kafka(mock.bootstrap_servers())).relay).await;
    // An operator raises the limit and redrives.
    let n = tools::dead_redrive(
        &db.pool,
        &SchemaName::default(),
        &DeadSelector::key("key-a"),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    drain(&in_process(&db.pool, config(), kafka(mock.bootstrap_servers())).relay).await;
    let records = read(&mock.bootstrap_servers(), TOPIC);
    let a: Vec<String> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("key-a"))
        .map(|r| String::from_utf8_lossy(&r.payload).trim().to_string())
        .collect();
    assert_eq!(
        a,
        ["key-a:0", "key-a:1", "key-a:2", "key-a:3"],
        "redriven event keeps its place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_retention_drops_expired_partitions_and_replay_dry_run_counts() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 2), ("orders.replayed", 1)]);
    let schema = SchemaName::default();
    let today: chrono::NaiveDate = sqlx::query_scalar("SELECT (now() AT TIME ZONE 'UTC')::date")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Partitions as a relay running for the last 20 days would have left them.
    for back in [20u64, 15, 9, 8, 7] {
        relay::retention::maintain(
            &db.pool,
            &schema,
            365,
            Some(today - chrono::Days::new(back)),
        )
        .await
        .unwrap();
    }
    let mut cfg = config();
    cfg.retention = Retention::Archive { ttl_days: 7 };
    let r = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    let plan = relay::retention::maintain(&db.pool, &schema, 7, None)
        .await
        .unwrap();
    assert!(plan.drop.contains(&relay::retention::partition_name(
        today - chrono::Days::new(20)
    )));
    let left = relay::retention::partitions(&db.pool, &schema)
        .await
        .unwrap();
    let oldest = left.first().unwrap();
    assert_eq!(
        *oldest,
        relay::retention::partition_name(today - chrono::Days::new(7)),
        "{left:?}"
    );
    assert!(
        left.contains(&relay::retention::partition_name(
            today + chrono::Days::new(3)
        )),
        "created ahead"
    );

    insert_events(&db.pool, 5, 50, 0).await;
    assert_eq!(drain(&r.relay).await, 50);
    let archived: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, kafka_offset FROM outbox.archive")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(archived.len(), 50);
    assert!(archived.iter().all(|(p, o)| *p >= 0 && *o >= 0));

    let filter = ReplayFilter {
        since: chrono::Utc::now() - chrono::Duration::hours(1),
        until: chrono::Utc::now() + chrono::Duration::hours(1),
        key: Some("key-1".into()),
        topic: None,
    };
    assert_eq!(
        tools::replay_count(&db.pool, &schema, &filter)
            .await
            .unwrap(),
        10
    );

    // The binary: --dry-run counts and produces nothing; a real replay to another topic sends them.
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args([
                "replay",
                "--since",
                &since,
                "--brokers",
                &mock.bootstrap_servers(),
            ])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap()
    };
    let out = run(&["--dry-run"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "dry run: 50 archived events match; nothing produced"
    );
    assert_eq!(read(&mock.bootstrap_servers(), "orders.replayed").len(), 0);
    let out = run(&["--to-topic", "orders.replayed", "--key", "key-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = read(&mock.bootstrap_servers(), "orders.replayed");
    assert_eq!(replayed.len(), 10);
    assert!(replayed
        .iter()
        .all(|r| r.headers["outbox.replayed"] == "true" && r.key.as_deref() == Some("key-1")));
    check_order(&replayed);
}

/// A failure about the record's topic (here: not authorized) counts toward `max_attempts`, unlike the
/// broker's own faults (see `ordering.rs`): retried with backoff, then dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_failures_back_off_then_dead_letter_at_max_attempts() {
    use rdkafka::types::RDKafkaRespErr;
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 2)]);
    insert_events(&db.pool, 2, 4, 0).await;
    let mut cfg = config();
    cfg.retry.max_attempts = 2;
    cfg.retry.backoff_base = std::time::Duration::from_millis(200);
    let mut k = kafka(mock.bootstrap_servers());
    k.delivery_timeout = std::time::Duration::from_millis(2000);
    let r = in_process(&db.pool, cfg.clone(), k);
    mock.topic_error(
        TOPIC,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();

    // First attempt: every event fails and is scheduled for a retry after its backoff.
    let first = r.relay.run_batch(None).await.unwrap();
    assert_eq!((first.claimed, first.retried, first.dead), (4, 4, 0));
    let rows: Vec<(i32, bool, Option<String>)> =
        sqlx::query_as("SELECT attempts, next_attempt_at > now(), last_error FROM outbox.events")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        rows.iter().all(|(a, later, err)| *a == 1
            && *later
            && err.as_deref().is_some_and(|e| e.contains("uthoriz"))),
        "{rows:?}"
    );
    assert_eq!(
        r.relay.run_batch(None).await.unwrap().claimed,
        0,
        "nothing is due during the backoff"
    );

    // Second attempt exhausts max_attempts: dead, reason max_attempts, keys parked.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = r.relay.run_batch(None).await.unwrap();
    assert_eq!(second.dead, 4);
    let dead = tools::dead_list(
        &db.pool,
        &SchemaName::default(),
        &DeadSelector::default(),
        10,
    )
    .await
    .unwrap();
    assert!(
        dead.iter()
            .all(|d| d.reason == "max_attempts" && d.attempts == 2 && d.parked),
        "{dead:?}"
    );

    // Later events of the parked keys wait, even with the topic back. (A fresh producer: the mock's
    // cleared topic error did not reach the first one's metadata cache within 30 s.)
    mock.topic_error(TOPIC, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let r = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    insert_events(&db.pool, 2, 2, 10).await;
    drain(&r.relay).await;
    assert_eq!(count(&db.pool, "outbox.events").await, 2);
    assert_eq!(
        tools::dead_redrive(&db.pool, &SchemaName::default(), &DeadSelector::default())
            .await
            .unwrap(),
        4
    );
    // The broker may need a moment after coming back; failed attempts back off and are retried.
    test_support::wait_for(
        "all six delivered",
        std::time::Duration::from_secs(30),
        || async {
            r.relay.run_batch(None).await.unwrap();
            (count(&db.pool, "outbox.events").await == 0).then_some(())
        },
    )
    .await;
    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_parked_by_a_batch_in_flight_is_withheld_from_the_batches_claimed_behind_it() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3), ("orders.dlq", 1)]);
    // Acknowledgments take 300 ms, so the loop claims and sends the next batches while the first awaits.
    mock.broker_round_trip_time(1, std::time::Duration::from_millis(300))
        .unwrap();
    // Batches of two: [a:0, b:0 OVERSIZED] [b:1, a:1] [b:2, c:0] [a:2, c:1].
    insert_raw(
        &db.pool,
        &[
            ("key-a", 10, 0),
            ("key-b", 20_000, 0),
            ("key-b", 10, 1),
            ("key-a", 10, 1),
            ("key-b", 10, 2),
            ("key-c", 10, 0),
            ("key-a", 10, 2),
            ("key-c", 10, 1),
        ],
    )
    .await;
    let mut cfg = small_limit(PoisonPolicy::ParkKey);
    cfg.batch_size = 2;
    cfg.in_flight_batches = 4;
    cfg.notify = false;
    let r = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = {
        let (relay, shutdown) = (r.relay.clone(), shutdown.clone());
        tokio::spawn(async move {
            relay
                .run(&mut relay::coordinator::Competing, shutdown)
                .await
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut deepest = 0.0f64;
    loop {
        deepest = deepest.max(metric(
            &r.metrics.render(),
            "outbox_relay_in_flight_batches",
        ));
        let left: Vec<String> = sqlx::query_scalar("SELECT key FROM outbox.events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        if left == ["key-b", "key-b"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "all but key-b's events settle; left {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    runner.await.unwrap().unwrap();
    assert!(
        deepest >= 2.0,
        "batches were in flight together (deepest {deepest})"
    );

    let delivered = read(&mock.bootstrap_servers(), TOPIC);
    let keys = |k: &str| -> Vec<String> {
        delivered
            .iter()
            .filter(|r| r.key.as_deref() == Some(k))
            .map(|r| String::from_utf8_lossy(&r.payload).trim().to_owned())
            .collect()
    };
    assert!(
        keys("key-b").is_empty(),
        "nothing of key-b passed its dead head: {:?}",
        keys("key-b")
    );
    assert_eq!(keys("key-a"), ["key-a:0", "key-a:1", "key-a:2"]);
    assert_eq!(keys("key-c"), ["key-c:0", "key-c:1"]);
    let parked: Vec<(String, bool)> = sqlx::query_as("SELECT key, parked FROM outbox.dead")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, [("key-b".to_owned(), true)]);
    assert_eq!(
        metric(&r.metrics.render(), "outbox_relay_order_violations_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_delivery_fails_while_batches_are_in_flight_keeps_its_order() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3)]);
    // Every produce is refused (retriable) until cleared: records time out after the delivery timeout.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
    );
    // Four events of keys p and a, each pair followed by two events of other keys: batches of two are in
    // flight together, but a key with a record in flight is withheld from the later ones, so p and a are
    // never in two batches at once (before, [p:0 a:0] [p:1 a:1] … were all in flight together).
    let fillers = [
        "key-b", "key-c", "key-d", "key-e", "key-f", "key-g", "key-h", "key-i",
    ];
    let rows: Vec<(&str, usize, u32)> = (0..4u32)
        .flat_map(|seq| {
            let i = seq as usize * 2;
            [
                ("key-p", 0, seq),
                ("key-a", 0, seq),
                (fillers[i], 0, 0),
                (fillers[i + 1], 0, 0),
            ]
        })
        .collect();
    insert_raw(&db.pool, &rows).await;
    let mut cfg = config();
    cfg.batch_size = 2;
    cfg.in_flight_batches = 4;
    cfg.notify = false;
    let mut k = kafka(mock.bootstrap_servers());
    k.delivery_timeout = std::time::Duration::from_secs(2);
    let r = in_process(&db.pool, cfg.clone(), k);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = {
        let (relay, shutdown) = (r.relay.clone(), shutdown.clone());
        tokio::spawn(async move {
            relay
                .run(&mut relay::coordinator::Competing, shutdown)
                .await
        })
    };
    let mut deepest = 0.0f64;
    test_support::wait_for(
        "deliveries failed while batches were in flight together",
        std::time::Duration::from_secs(60),
        || {
            let m = r.metrics.render();
            deepest = deepest.max(metric(&m, "outbox_relay_in_flight_batches"));
            let failed = metric(&m, "outbox_relay_retries_total") >= 8.0;
            async move { (failed && deepest >= 2.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        count(&db.pool, "outbox.events").await,
        16,
        "nothing delivered yet"
    );
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    // librdkafka 2.12's idempotent producer, after bumping its epoch on these timeouts, may never send or
    // time out the next records: the relay then gives up on the batch at the producer's deadline, rolls
    // back and exits (its pod restarts). Either way a relay with a fresh producer finishes the work.
    let finished = test_support::wait_for(
        "everything delivered, or the relay exited on a stuck producer",
        std::time::Duration::from_secs(60),
        || {
            let pool = db.pool.clone();
            let exited = runner.is_finished();
            async move { (exited || count(&pool, "outbox.events").await == 0).then_some(exited) }
        },
    )
    .await;
    println!("relay exited on a stuck producer: {finished}");
    let r2 = if finished {
        let err = runner
            .await
            .unwrap()
            .expect_err("only a stuck producer ends the relay");
        assert!(err.to_string().contains("producer stuck"), "{err}");
        assert!(
            metric(&r.metrics.render(), "outbox_relay_batch_errors_total") >= 1.0,
            "the rolled-back batches are counted"
        );
        let r2 = in_process(&db.pool, cfg.clone(), kafka(mock.bootstrap_servers()));
        let runner = spawn_run(r2.relay.clone(), shutdown.clone());
        test_support::wait_for(
            "a fresh relay delivers everything",
            std::time::Duration::from_secs(60),
            || {
                let pool = db.pool.clone();
                async move { (count(&pool, "outbox.events").await == 0).then_some(()) }
            },
        )
        .await;
        shutdown.cancel();
        runner.await.unwrap();
        Some(r2)
    } else {
        shutdown.cancel();
        runner.await.unwrap().unwrap();
        None
    };
    // Per key, no event reaches Kafka for the first time after a later one; all sixteen arrive.
    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 16, "nothing lost");
    for m in std::iter::once(&r).chain(r2.as_ref()) {
        assert_eq!(
            metric(&m.metrics.render(), "outbox_relay_order_violations_total"),
            0.0
        );
    }
}
