//! Per-key order and nothing lost under the schedules that break them: late commits below the batches
//! in flight, rows redriven or unparked below the claim's start, keys in flight, long broker outages, an
//! unavailable DLQ topic and unknown partition counts. Each schedule is built deterministically: the test
//! holds transactions open itself and uses the mock cluster's round-trip times and errors.

mod common;

use std::time::Duration;

use common::*;
use outbox::{NewEvent, SchemaName};
use rdkafka::types::RDKafkaRespErr;
use relay::decide::{Delivery, Fault};
use relay::producer::Partitioning;
use relay::store::{Claim, Store};
use relay::tools::{self, DeadSelector};
use test_support::history::{self, Written};
use test_support::kafka::mock_cluster;

/// Writes one event of `key` with payload `<key>:<seq>` in `tx`.
async fn write(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, key: &str, seq: u32) -> String {
    let ev = NewEvent::new(TOPIC, key).payload(format!("{key}:{seq}").into_bytes());
    outbox::publish(tx, ev).await.unwrap().to_string()
}

/// Commits one event of `key` on its own.
async fn commit_one(pool: &sqlx::PgPool, key: &str, seq: u32) -> String {
    let mut tx = pool.begin().await.unwrap();
    let id = write(&mut tx, key, seq).await;
    tx.commit().await.unwrap();
    id
}

/// The keys of a claim, in claim order.
async fn claimed(pool: &sqlx::PgPool, claim: &Claim) -> Vec<String> {
    let store = Store::new(SchemaName::default());
    let mut tx = pool.begin().await.unwrap();
    let batch = store.claim(&mut tx, 100, claim).await.unwrap();
    tx.rollback().await.unwrap();
    batch
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect()
}

/// Moves the pending event with this payload to dead, parked, as the relay does at max attempts.
async fn dead_letter(pool: &sqlx::PgPool, payload: &str) {
    sqlx::query("WITH d AS (DELETE FROM outbox.events WHERE payload = $1 RETURNING *) \
                 INSERT INTO outbox.dead (id, event_id, topic, key, payload, headers, created_at, attempts, reason, error, parked) \
                 SELECT id, event_id, topic, key, payload, headers, created_at, 10, 'max_attempts', 'x', true FROM d")
        .bind(payload.as_bytes())
        .execute(pool)
        .await
        .unwrap();
}

async fn ids(pool: &sqlx::PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM outbox.events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Writer A holds K:0 uncommitted while B commits X:0; the relay claims [X:0] (a claim from the start,
/// so the next claims start above it) and waits 400 ms for its acknowledgment. Meanwhile A commits K:0 and
/// C, serialised on K after A, commits K:1. The claim overlapping the commit of [X:0] starts above X:0:
/// before the fix it took K:1 (its earlier K:0 had never failed), and K:0 followed in the next scan
/// from the start — K's partition held K:1 before K:0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_below_the_batches_in_flight_is_not_overtaken_by_its_key() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3)]);
    mock.broker_round_trip_time(1, Duration::from_millis(400))
        .unwrap();
    let mut cfg = config();
    cfg.in_flight_batches = 4;
    let r = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = spawn_run(r.relay.clone(), shutdown.clone());
    // Warm up: the producer has its metadata and producer id, so an acknowledgment takes one round trip
    // (400 ms), well inside the second after a claim from the start.
    let mut written = Written::new();
    written.push("key-w", commit_one(&db.pool, "key-w", 0).await);
    test_support::wait_for("the warm-up delivered", Duration::from_secs(30), || {
        let pool = db.pool.clone();
        async move { (count(&pool, "outbox.events").await == 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut a = db.pool.begin().await.unwrap();
    let k0 = write(&mut a, "key-k", 0).await;
    written.push("key-x", commit_one(&db.pool, "key-x", 0).await);
    test_support::wait_for("X:0 in flight", Duration::from_secs(10), || {
        let m = r.metrics.render();
        async move { (metric(&m, "outbox_relay_in_flight_batches") >= 1.0).then_some(()) }
    })
    .await;
    a.commit().await.unwrap();
    written.push("key-k", k0);
    written.push("key-k", commit_one(&db.pool, "key-k", 1).await);

    test_support::wait_for("all delivered", Duration::from_secs(30), || {
        let pool = db.pool.clone();
        async move { (count(&pool, "outbox.events").await == 0).then_some(()) }
    })
    .await;
    shutdown.cancel();
    runner.await.unwrap();
    let report = history::check(&read(&mock.bootstrap_servers(), TOPIC), &written);
    assert!(report.holds(), "{}", report.summary());
    assert_eq!(report.delivered, 4);
}

/// Rows at or below the claim's start that are not in hand hold their keys back, whatever their
/// attempts: a late commit, a redriven dead row (re-inserted with its original id and attempts 0) and
/// the later events a discard unparks. Before the fix, a claim above them took the later events of
/// those keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_below_the_claims_start_hold_their_keys_back_whatever_their_attempts() {
    let db = migrated_db().await;
    let pool = &db.pool;
    // K:0 K:1 J:0 L:0 | K:2 J:1 L:1
    for (key, seq) in [("key-k", 0), ("key-k", 1), ("key-j", 0), ("key-l", 0)] {
        commit_one(pool, key, seq).await;
    }
    let low = *ids(pool).await.last().unwrap();
    for (key, seq) in [("key-k", 2), ("key-j", 1), ("key-l", 1)] {
        commit_one(pool, key, seq).await;
    }
    let above = Claim {
        after: low,
        in_flight: vec![],
    };
    assert_eq!(
        claimed(pool, &above).await,
        Vec::<String>::new(),
        "every key has a pending row at or below the start"
    );
    assert_eq!(claimed(pool, &Claim::from_start()).await.len(), 7);

    // A redriven head: K:0 dead and parked, then redriven (attempts 0, its original id).
    dead_letter(pool, "key-k:0").await;
    assert!(
        !claimed(pool, &Claim::from_start())
            .await
            .iter()
            .any(|p| p.starts_with("key-k")),
        "K is parked"
    );
    let selector = DeadSelector::default();
    assert_eq!(
        tools::dead_redrive(pool, &SchemaName::default(), &selector)
            .await
            .unwrap(),
        1
    );
    let redriven_id: i64 = sqlx::query_scalar(
        "SELECT id FROM outbox.events WHERE payload = 'key-k:0' AND attempts = 0",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let above_redriven = Claim {
        after: redriven_id,
        in_flight: vec![],
    };
    assert!(
        !claimed(pool, &above_redriven)
            .await
            .iter()
            .any(|p| p.starts_with("key-k")),
        "nothing of K passes its redriven head"
    );

    // A discard unparks K's later events, which sit below the start of the claims above them.
    dead_letter(pool, "key-k:0").await;
    tools::dead_discard(pool, &SchemaName::default(), &selector)
        .await
        .unwrap();
    let k1: i64 = sqlx::query_scalar("SELECT id FROM outbox.events WHERE payload = 'key-k:1'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        claimed(
            pool,
            &Claim {
                after: k1,
                in_flight: vec![]
            }
        )
        .await
        .iter()
        .filter(|p| p.starts_with("key-k"))
        .count(),
        0,
        "K:2 waits for K:1, unparked below the start"
    );
    let from_start = claimed(pool, &Claim::from_start()).await;
    let ks: Vec<&String> = from_start
        .iter()
        .filter(|p| p.starts_with("key-k"))
        .collect();
    assert_eq!(
        ks,
        ["key-k:1", "key-k:2"],
        "a claim from the start takes both, in order"
    );
}

/// A key with a record in flight is withheld from later batches: the idempotent producer keeps a key's
/// order only while it retries, not once a record timed out, so a later batch must not carry the key
/// before the earlier record is acknowledged. Shown at the claim from the start, where the rows in flight
/// are locked by their own transactions (and skipped), and only the ids in hand can say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_flight_is_withheld_from_later_batches() {
    let db = migrated_db().await;
    let pool = &db.pool;
    for (key, seq) in [("key-k", 0), ("key-j", 0), ("key-k", 1), ("key-j", 1)] {
        commit_one(pool, key, seq).await;
    }
    let all = ids(pool).await;
    // Batch N holds K:0 (locked by its open claim transaction, as in the relay).
    let mut in_flight = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox.events WHERE id = $1 FOR UPDATE")
        .bind(all[0])
        .execute(&mut *in_flight)
        .await
        .unwrap();
    let next = claimed(
        pool,
        &Claim {
            after: 0,
            in_flight: vec![all[0]],
        },
    )
    .await;
    assert_eq!(
        next,
        ["key-j:0", "key-j:1"],
        "K:1 waits for K:0's acknowledgment"
    );
    in_flight.rollback().await.unwrap();
}

/// The claim looks at a bounded window of due rows (limit x `CLAIM_SCAN_FACTOR`), but a key that waits for
/// long — parked by a dead event, or with an event in backoff — must not fill that window and stall every
/// other key behind it: such keys are skipped before the window is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_key_with_more_rows_than_the_window_does_not_stall_the_others() {
    let db = migrated_db().await;
    let pool = &db.pool;
    let window = 100 * relay::store::CLAIM_SCAN_FACTOR as u32; // `claimed` claims 100
    for key in ["key-parked", "key-backoff"] {
        let mut tx = pool.begin().await.unwrap();
        for seq in 0..window + 10 {
            write(&mut tx, key, seq).await;
        }
        tx.commit().await.unwrap();
    }
    commit_one(pool, "key-q", 0).await;
    dead_letter(pool, "key-parked:0").await;
    sqlx::query(
        "UPDATE outbox.events SET attempts = 1, next_attempt_at = now() + interval '1 hour' \
         WHERE payload = 'key-backoff:0'",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(
        claimed(pool, &Claim::from_start()).await,
        ["key-q:0"],
        "the parked key and the key in backoff wait; the key behind them does not"
    );
}

/// The broker is down for 30 delivery timeouts (1 s each), longer than the attempts (10, the default)
/// with a short backoff would last: the failures are the broker's, so no attempt is counted, claiming
/// stops until it answers, nothing is dead-lettered and everything arrives in key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_the_attempts_dead_letters_nothing() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3)]);
    let mut cfg = config();
    cfg.retry.max_attempts = 10;
    cfg.retry.backoff_base = Duration::from_millis(100);
    cfg.retry.backoff_max = Duration::from_secs(1);
    let mut k = kafka(mock.bootstrap_servers());
    k.delivery_timeout = Duration::from_secs(1);
    insert_events(&db.pool, 20, 200, 0).await;
    mock.broker_down(1).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let r = in_process(&db.pool, cfg.clone(), k.clone());
    let mut runner = {
        let (relay, shutdown) = (r.relay.clone(), shutdown.clone());
        tokio::spawn(async move {
            relay
                .run(&mut relay::coordinator::Competing, shutdown)
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    let m = r.metrics.render();
    assert!(
        metric(&m, "outbox_relay_broker_waits_total") >= 1.0,
        "claiming stopped"
    );
    assert_eq!(metric(&m, "outbox_relay_claiming_paused"), 1.0, "{m}");
    assert!(!r.health.readiness().ready, "readiness shows the wait");
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT coalesce(max(attempts), 0) FROM outbox.events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(max_attempts, 0, "the broker's faults count no attempt");
    mock.broker_up(1).unwrap();
    insert_events(&db.pool, 20, 100, 10).await;
    let mut relays = vec![r];
    test_support::wait_for(
        "everything delivered after the outage",
        Duration::from_secs(90),
        || {
            // librdkafka 2.12's idempotent producer can stay stuck after epoch bumps on timeouts; the relay
            // then exits at the producer's deadline (its pod restarts): start a fresh one, as Kubernetes would.
            if runner.is_finished() {
                let r = in_process(&db.pool, cfg.clone(), k.clone());
                runner = {
                    let (relay, shutdown) = (r.relay.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        relay
                            .run(&mut relay::coordinator::Competing, shutdown)
                            .await
                    })
                };
                relays.push(r);
            }
            let pool = db.pool.clone();
            async move { (count(&pool, "outbox.events").await == 0).then_some(()) }
        },
    )
    .await;
    shutdown.cancel();
    let _ = runner.await.unwrap();
    assert_eq!(
        count(&db.pool, "outbox.dead").await,
        0,
        "nothing dead-lettered"
    );
    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 300, "nothing lost");
    for r in &relays {
        assert_eq!(
            metric(&r.metrics.render(), "outbox_relay_order_violations_total"),
            0.0
        );
    }
}

/// `<topic>.dlq` refuses every produce while two undeliverable events sit among 100 good ones: the batch
/// commits once (no rollback, no duplicate), the two dead rows commit with it, and their DLQ copies go
/// out once the topic accepts them again. Before the fix the DLQ copy was awaited inside the claim
/// transaction, one event at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_dlq_topic_neither_blocks_nor_repeats_the_main_flow() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 3), ("orders.dlq", 1)]);
    mock.topic_error(
        "orders.dlq",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..100u32 {
        write(&mut tx, &format!("key-{}", i % 10), i / 10).await;
        if i == 30 || i == 70 {
            let big = NewEvent::new(TOPIC, format!("big-{i}")).payload(vec![b'x'; 20_000]);
            outbox::publish(&mut tx, big).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    let mut cfg = config();
    cfg.max_message_bytes = 10_000;
    cfg.dlq = true;
    let mut k = kafka(mock.bootstrap_servers());
    k.delivery_timeout = Duration::from_secs(2);
    let r = in_process(&db.pool, cfg, k);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = spawn_run(r.relay.clone(), shutdown.clone());
    test_support::wait_for("the good events delivered", Duration::from_secs(30), || {
        let pool = db.pool.clone();
        async move { (count(&pool, "outbox.events").await == 0).then_some(()) }
    })
    .await;
    test_support::wait_for("a DLQ copy refused", Duration::from_secs(30), || {
        let m = r.metrics.render();
        async move { (metric(&m, "outbox_relay_dlq_failures_total") >= 1.0).then_some(()) }
    })
    .await;
    let due: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead WHERE dlq_due")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(due, 2, "two dead rows, their copies still due");
    let m = r.metrics.render();
    assert_eq!(
        metric(&m, "outbox_relay_batch_errors_total"),
        0.0,
        "nothing rolled back"
    );
    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(
        (ledger.distinct, ledger.duplicates),
        (100, 0),
        "one commit, no duplicates"
    );

    mock.topic_error("orders.dlq", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    test_support::wait_for("the DLQ copies sent", Duration::from_secs(60), || {
        let pool = db.pool.clone();
        async move {
            let due: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead WHERE dlq_due")
                .fetch_one(&pool)
                .await
                .unwrap();
            (due == 0).then_some(())
        }
    })
    .await;
    shutdown.cancel();
    runner.await.unwrap();
    let dlq = read(&mock.bootstrap_servers(), "orders.dlq");
    assert_eq!(dlq.len(), 2, "each copy once");
    assert!(dlq
        .iter()
        .all(|d| d.headers["outbox.reason"] == "too_large" && d.payload.is_empty()));
    assert_eq!(
        metric(&r.metrics.render(), "outbox_relay_dlq_published_total"),
        2.0
    );
}

/// Under event-type partitioning, a record whose topic's partition count cannot be read waits (a broker
/// fault, no attempt counted) instead of going to librdkafka's key partitioner, and so do the later
/// records of that topic in the batch. Before the fix, "no partition" handed it to librdkafka's partitioner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_partition_cannot_be_chosen_waits() {
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    mock.topic_error(
        TOPIC,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    )
    .unwrap();
    let mut k = kafka(mock.bootstrap_servers());
    k.partitioning = Partitioning::EventType;
    k.delivery_timeout = Duration::from_secs(2);
    let producer = relay::producer::Producer::new(k, Default::default()).unwrap();
    let batch: Vec<_> = (0..3)
        .map(|i| {
            let mut e = relay::event::ClaimedEvent::for_test(i, TOPIC, "key-a", b"x".to_vec());
            e.event_type = Some("OrderCreated".into());
            e
        })
        .collect();
    let outcomes = producer.send_all(&batch, vec![None, None, None]).await;
    for (d, _) in &outcomes {
        assert!(
            matches!(d, Delivery::Failed { code, fault: Fault::Broker, .. } if code == "partition_unknown"),
            "{d:?}"
        );
    }
}

/// The claim's SQL and the model's claim rule ([`relay::decide::claimable`], which the simulation in
/// `tests/model.rs` runs) select the same rows on random tables: keys, rows in backoff, rows locked by a
/// batch in flight, parked keys, claims from the start or above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_sql_is_the_model_claim_rule() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use relay::decide::{claimable, PendingRow};
    use std::collections::HashSet;

    let db = migrated_db().await;
    let pool = &db.pool;
    let store = Store::new(SchemaName::default());
    // Each row: (key 0..4, in backoff, locked); then parked keys, after, from-start.
    let table = (
        prop::collection::vec(
            (
                0..4usize,
                prop::bool::weighted(0.2),
                prop::bool::weighted(0.2),
            ),
            1..24,
        ),
        prop::collection::vec(0..4usize, 0..2),
        0..24i64,
        any::<bool>(),
    );
    let mut runner = TestRunner::deterministic();
    for case in 0..150 {
        let (rows, parked, after, from_start) = table.new_tree(&mut runner).unwrap().current();
        sqlx::query("TRUNCATE outbox.events, outbox.dead")
            .execute(pool)
            .await
            .unwrap();
        let mut ids = vec![];
        for (i, (key, backoff, _)) in rows.iter().enumerate() {
            let id = i as i64 + 1;
            sqlx::query("INSERT INTO outbox.events (id, event_id, topic, key, payload, next_attempt_at) \
                         VALUES ($1, gen_random_uuid(), 'orders', $2, '', now() + CASE WHEN $3 THEN interval '1 hour' ELSE interval '0' END)")
                .bind(id)
                .bind(format!("k{key}"))
                .bind(*backoff)
                .execute(pool)
                .await
                .unwrap();
            ids.push(id);
        }
        for k in &parked {
            sqlx::query("INSERT INTO outbox.dead (id, event_id, topic, key, payload, headers, created_at, attempts, reason, error, parked) \
                         VALUES (1000 + $1, gen_random_uuid(), 'orders', $2, '', '{}', now(), 1, 'rejected', 'x', true) ON CONFLICT DO NOTHING")
                .bind(*k as i64)
                .bind(format!("k{k}"))
                .execute(pool)
                .await
                .unwrap();
        }
        let locked: Vec<i64> = rows
            .iter()
            .zip(&ids)
            .filter(|((_, _, l), _)| *l)
            .map(|(_, id)| *id)
            .collect();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM outbox.events WHERE id = ANY($1) FOR UPDATE")
            .bind(&locked)
            .execute(&mut *holder)
            .await
            .unwrap();
        let claim = if from_start {
            Claim {
                after: 0,
                in_flight: locked.clone(),
            }
        } else {
            Claim {
                after,
                in_flight: vec![],
            }
        };
        let mut tx = pool.begin().await.unwrap();
        let got: Vec<i64> = store
            .claim(&mut tx, 10, &claim)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        tx.rollback().await.unwrap();
        holder.rollback().await.unwrap();
        let model: Vec<PendingRow> = rows
            .iter()
            .zip(&ids)
            .map(|((key, backoff, l), id)| PendingRow {
                id: *id,
                key: (TOPIC.into(), format!("k{key}")),
                due: !backoff,
                locked: *l,
            })
            .collect();
        let parked: HashSet<_> = parked
            .iter()
            .map(|k| (TOPIC.to_owned(), format!("k{k}")))
            .collect();
        let want = claimable(&model, &claim, 10, &parked);
        assert_eq!(
            got, want,
            "case {case}: rows {rows:?} parked {parked:?} claim {claim:?}"
        );
    }
}
