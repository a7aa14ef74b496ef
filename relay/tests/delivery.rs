//! Delivery contract against real PostgreSQL and librdkafka's mock cluster: nothing lost, per-key order.

mod common;

use std::time::Duration;

use common::*;
use test_support::kafka::mock_cluster;
use test_support::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_over_100_keys_arrive_once_in_key_order() {
    let db = migrated_db().await;
    let mock = mock_cluster(3, &[(TOPIC, 8)]);
    insert_events(&db.pool, 100, 10_000, 0).await;

    let r = in_process(&db.pool, config(), kafka(mock.bootstrap_servers()));
    assert_eq!(drain(&r.relay).await, 10_000);
    assert_eq!(count(&db.pool, "outbox.events").await, 0);

    let records = read(&mock.bootstrap_servers(), TOPIC);
    let ledger = check_order(&records);
    assert_eq!(ledger.distinct, 10_000, "every event delivered");
    assert_eq!(ledger.duplicates, 0, "no faults, no duplicates");
    assert_eq!(ledger.records, 10_000);
    for rec in &records {
        let key = rec.key.as_deref().unwrap();
        assert_eq!(
            rec.partition,
            relay::producer::java_partition(key.as_bytes(), 8),
            "Java-client partition for {key}"
        );
    }
    let m = r.metrics.render();
    assert_eq!(metric(&m, "outbox_relay_published_total"), 10_000.0);
    assert!(metric(&m, "outbox_relay_commit_to_ack_seconds_count") >= 10_000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_id_committed_late_is_not_skipped() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 2)]);
    let r = in_process(&db.pool, config(), kafka(mock.bootstrap_servers()));

    // Writer A takes the lower id and holds its transaction open.
    let mut slow = db.pool.begin().await.unwrap();
    outbox::publish(
        &mut slow,
        outbox::NewEvent::new(TOPIC, "slow").payload(b"slow:0".to_vec()),
    )
    .await
    .unwrap();
    // Writers B and C commit higher ids, which get published first.
    insert_events(&db.pool, 2, 2, 0).await;
    assert_eq!(drain(&r.relay).await, 2);
    slow.commit().await.unwrap();
    assert_eq!(drain(&r.relay).await, 1, "the late commit is picked up");

    let records = read(&mock.bootstrap_servers(), TOPIC);
    assert_eq!(records.len(), 3);
    assert!(records.iter().any(|r| r.key.as_deref() == Some("slow")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_ten_seconds_loses_nothing_and_shows_in_readiness_and_metrics() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    let mut k = kafka(mock.bootstrap_servers());
    k.delivery_timeout = Duration::from_secs(2);
    let r = in_process(&db.pool, config(), k);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let port = test_support::free_port();
    relay::http::serve(
        ([127, 0, 0, 1], port).into(),
        relay::http::Surfaces {
            health: r.health.clone(),
            metrics: r.metrics.clone(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    r.relay.spawn_monitors(shutdown.clone());
    let run = spawn_run(r.relay.clone(), shutdown.clone());
    wait_for("ready", Duration::from_secs(20), || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;

    insert_events(&db.pool, 20, 200, 0).await;
    wait_for(
        "first events published",
        Duration::from_secs(20),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;

    mock.broker_down(1).unwrap();
    insert_events(&db.pool, 20, 400, 10).await;
    let (status, body) = wait_for("readiness false", Duration::from_secs(15), || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("\"broker\":false"), "{body}");
    let metrics = wait_for(
        "retries with backoff in metrics",
        Duration::from_secs(15),
        || async {
            let (_, m) = http_get(port, "/metrics").await?;
            (metric(&m, "outbox_relay_retries_total") > 0.0).then_some(m)
        },
    )
    .await;
    assert!(metric(&metrics, "outbox_relay_delivery_failures_total") > 0.0);
    wait_for("broker_up gauge at 0", Duration::from_secs(10), || async {
        let (_, m) = http_get(port, "/metrics").await?;
        (metric(&m, "outbox_relay_broker_up") == 0.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await; // down for ~10 s in all
    assert!(
        count(&db.pool, "outbox.events").await > 0,
        "nothing can be delivered while the broker is down"
    );
    mock.broker_up(1).unwrap();

    wait_for(
        "backlog drained after recovery",
        Duration::from_secs(60),
        || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
    )
    .await;
    wait_for("ready again", Duration::from_secs(20), || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    shutdown.cancel();
    run.await.unwrap();

    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 600, "nothing lost");
    assert_eq!(count(&db.pool, "outbox.dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_type_and_round_robin_partitioning() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    let mut tx = db.pool.begin().await.unwrap();
    let events = (0..40)
        .map(|i| {
            let ty = if i % 2 == 0 {
                "OrderCreated"
            } else {
                "OrderShipped"
            };
            outbox::NewEvent::new(TOPIC, format!("k{i}"))
                .payload(format!("k{i}:0"))
                .event_type(ty)
        })
        .collect();
    outbox::publish_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
    let mut k = kafka(mock.bootstrap_servers());
    k.partitioning = relay::producer::Partitioning::EventType;
    drain(&in_process(&db.pool, config(), k).relay).await;
    let records = read(&mock.bootstrap_servers(), TOPIC);
    assert_eq!(records.len(), 40);
    for r in &records {
        let ty = &r.headers["event_type"];
        assert_eq!(
            r.partition,
            relay::producer::java_partition(ty.as_bytes(), 4),
            "{ty}"
        );
    }

    let rr_topic_db = migrated_db().await;
    insert_events(&rr_topic_db.pool, 1, 40, 0).await; // one key: round-robin must still spread it
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    let mut k = kafka(mock.bootstrap_servers());
    k.partitioning = relay::producer::Partitioning::RoundRobin;
    drain(&in_process(&rr_topic_db.pool, config(), k).relay).await;
    let mut per_partition = [0; 4];
    for r in read(&mock.bootstrap_servers(), TOPIC) {
        per_partition[r.partition as usize] += 1;
    }
    assert_eq!(per_partition, [10, 10, 10, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_relays_share_the_work_and_lose_nothing() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    insert_events(&db.pool, 50, 5_000, 0).await;
    let mut cfg = config();
    cfg.batch_size = 100;
    let a = in_process(&db.pool, cfg.clone(), kafka(mock.bootstrap_servers()));
    let b = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runs = [
        spawn_run(a.relay.clone(), shutdown.clone()),
        spawn_run(b.relay.clone(), shutdown.clone()),
    ];
    wait_for("drained by two relays", Duration::from_secs(60), || async {
        (count(&db.pool, "outbox.events").await == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    for r in runs {
        r.await.unwrap();
    }
    let (pa, pb) = (
        metric(&a.metrics.render(), "outbox_relay_published_total"),
        metric(&b.metrics.render(), "outbox_relay_published_total"),
    );
    assert_eq!(pa + pb, 5_000.0);
    assert!(pa > 0.0 && pb > 0.0, "both relays published ({pa} / {pb})");
    // Competing mode promises no loss and no duplicates without faults, not cross-batch order.
    let records = read(&mock.bootstrap_servers(), TOPIC);
    let ids: std::collections::HashSet<_> = records
        .iter()
        .map(|r| r.headers["event_id"].clone())
        .collect();
    assert_eq!((records.len(), ids.len()), (5_000, 5_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_long_before_the_poll_interval() {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 1)]);
    let mut cfg = config();
    cfg.poll_interval = Duration::from_secs(60);
    let r = in_process(&db.pool, cfg, kafka(mock.bootstrap_servers()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = spawn_run(r.relay.clone(), shutdown.clone());
    // After a partial batch the relay sleeps for the 60 s poll interval, so at least the second
    // delivery can only come from a NOTIFY waking it.
    for round in 0..2 {
        insert_events(&db.pool, 1, 1, round).await;
        wait_for(
            "delivery woken by NOTIFY",
            Duration::from_secs(10),
            || async { (count(&db.pool, "outbox.events").await == 0).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        metric(&r.metrics.render(), "outbox_relay_published_total"),
        2.0
    );
    shutdown.cancel();
    run.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_while_the_database_is_unreachable() {
    // Its own server, so stopping it disturbs no other test.
    let pg = test_support::pg::PgServer::start(test_support::pg::Durability::Throwaway).unwrap();
    let url = pg.create_database().await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    outbox::migrate(&pool, "outbox").await.unwrap();
    let mock = mock_cluster(1, &[(TOPIC, 1)]);
    let r = in_process(&pool, config(), kafka(mock.bootstrap_servers()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    r.relay.spawn_monitors(shutdown.clone());
    let run = spawn_run(r.relay.clone(), shutdown.clone());
    wait_for("ready", Duration::from_secs(20), || async {
        r.health.readiness().ready.then_some(())
    })
    .await;
    drop(pg);
    let readiness = wait_for("not ready", Duration::from_secs(20), || async {
        Some(r.health.readiness()).filter(|r| !r.ready)
    })
    .await;
    assert!(!readiness.database && readiness.broker, "{readiness:?}");
    shutdown.cancel();
    run.await.unwrap();
}
