//! The runtime against a real PostgreSQL and librdkafka's mock cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer_runtime::metrics::Metrics;
use consumer_runtime::{Handler, HandlerError, Message, RetryPolicy, Runtime, RuntimeConfig};
use outbox::SchemaName;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::{PgPool, Postgres, Transaction};
use test_support::kafka::mock_cluster;
use test_support::wait_for;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TOPIC: &str = "orders";

/// Writes one `effects` row per handled event (no unique constraint: a duplicate effect would show).
/// Payload "fail-N" fails retriably N times; "poison" fails permanently; "drop-connection-N" kills its own
/// database session N times (as a PostgreSQL restart does) and reports that as a retriable failure.
#[derive(Clone, Default)]
struct Effects {
    failures: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl Handler for Effects {
    async fn handle(
        &self,
        msg: &Message,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let body = String::from_utf8_lossy(&msg.payload).to_string();
        if body == "poison" {
            return Err(HandlerError::Permanent("poison payload".into()));
        }
        if let Some(n) = body
            .strip_prefix("fail-")
            .and_then(|n| n.parse::<u32>().ok())
        {
            let mut f = self.failures.lock().unwrap();
            let seen = f.entry(msg.event_id).or_insert(0);
            if *seen < n {
                *seen += 1;
                return Err(HandlerError::Retriable(format!("failure {seen} of {n}")));
            }
        }
        if let Some(n) = body
            .strip_prefix("drop-connection-")
            .and_then(|n| n.parse::<u32>().ok())
        {
            let drop_it = {
                let mut f = self.failures.lock().unwrap();
                let seen = f.entry(msg.event_id).or_insert(0);
                *seen += 1;
                *seen <= n
            };
            if drop_it {
                let r = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                    .execute(&mut **tx)
                    .await;
                return Err(HandlerError::Retriable(format!(
                    "connection dropped: {r:?}"
                )));
            }
        }
        sqlx::query("INSERT INTO effects (event_id, payload) VALUES ($1, $2)")
            .bind(msg.event_id)
            .bind(body)
            .execute(&mut **tx)
            .await
            .map_err(|e| HandlerError::Retriable(e.to_string()))?;
        Ok(())
    }
}

async fn setup() -> PgPool {
    let db = test_support::pg::fresh_db().await;
    consumer_runtime::inbox::migrate(&db.pool, &SchemaName::new("inbox").unwrap())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (event_id uuid NOT NULL, payload text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db.pool
}

fn config(brokers: String, group: &str) -> RuntimeConfig {
    RuntimeConfig {
        group_id: group.into(),
        topics: vec![TOPIC.into()],
        brokers,
        kafka_extra: vec![],
        inbox_schema: SchemaName::new("inbox").unwrap(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        },
        session_timeout: Duration::from_secs(6),
        instance_id: "test".into(),
        batch_size: 100,
        concurrency: 2,
        inbox_retention: None,
        rejoin_timeout: Duration::from_secs(60),
        accept_offset_gaps: false,
    }
}

async fn produce(brokers: &str, records: &[(Option<Uuid>, &str, &str)]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (id, key, payload) in records {
        let mut headers = OwnedHeaders::new();
        let id_text = id.map(|i| i.to_string());
        if let Some(t) = &id_text {
            headers = headers.insert(Header {
                key: "event_id",
                value: Some(t.as_bytes()),
            });
        }
        p.send(
            FutureRecord::to(TOPIC)
                .key(*key)
                .payload(*payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn start(
    pool: &PgPool,
    cfg: RuntimeConfig,
) -> (Arc<Metrics>, CancellationToken, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::default());
    let rt = Runtime::new(cfg, pool.clone(), Effects::default(), metrics.clone()).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { rt.run(s).await.unwrap() });
    (metrics, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_have_one_effect() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 3)]);
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    let mut records: Vec<(Option<Uuid>, &str, &str)> =
        ids.iter().map(|id| (Some(*id), "k", "ok")).collect();
    records.extend(ids.iter().take(40).map(|id| (Some(*id), "k", "ok"))); // the relay re-sent 40 after a crash
    produce(&mock.bootstrap_servers(), &records).await;

    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "pharmacy"));
    wait_for(
        "140 deliveries handled",
        Duration::from_secs(30),
        || async { (metrics.processed.get() + metrics.duplicates.get() == 140).then_some(()) },
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM effects").await,
        100,
        "one effect per event"
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT event_id) FROM effects").await,
        100
    );
    assert_eq!(metrics.duplicates.get(), 40);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM inbox.inbox WHERE group_id = 'pharmacy'"
        )
        .await,
        100
    );

    // A second group sees every event once more, independently.
    let (m2, stop, task) = start(&pool, config(mock.bootstrap_servers(), "notification"));
    wait_for("second group done", Duration::from_secs(30), || async {
        (m2.processed.get() + m2.duplicates.get() == 140).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM effects").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_failures_retry_with_backoff_and_other_partitions_flow() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 2), ("orders.dlq", 1)]);
    let flaky = Uuid::now_v7();
    let mut records = vec![(Some(flaky), "a", "fail-2")];
    let others: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    records.extend(others.iter().map(|id| (Some(*id), "b", "ok")));
    produce(&mock.bootstrap_servers(), &records).await;

    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("all handled", Duration::from_secs(30), || async {
        (metrics.processed.get() == 21).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(metrics.retries.get(), 2, "two failures, two retries");
    assert_eq!(metrics.dead_lettered.get(), 0);
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM effects WHERE event_id = '{flaky}'")
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_because_its_database_connection_died_is_not_an_attempt() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 1), ("orders.dlq", 1)]);
    // Five dropped sessions against three attempts: counted as attempts, the event would be dead-lettered.
    let (alone, batched) = (Uuid::now_v7(), Uuid::now_v7());
    let mut records = vec![(Some(alone), "k", "drop-connection-5")];
    let rest: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    records.extend(rest.iter().map(|id| (Some(*id), "k", "ok")));
    records.push((Some(batched), "k", "drop-connection-5"));
    produce(&mock.bootstrap_servers(), &records).await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("all handled", Duration::from_secs(60), || async {
        (metrics.processed.get() == 12).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(metrics.dead_lettered.get(), 0, "nothing dead-lettered");
    assert_eq!(
        metrics.retries.get(),
        0,
        "no handler attempt was counted for a dropped connection"
    );
    assert!(
        metrics.database_errors.get() >= 10,
        "each drop is a database error: {}",
        metrics.database_errors.get()
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT event_id) FROM effects").await,
        12
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM effects").await, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_exhausted_and_undecodable_records_go_to_the_dlq_and_the_rest_flow() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 1), ("orders.dlq", 1)]);
    let (poison, stubborn, good) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    produce(
        &mock.bootstrap_servers(),
        &[
            (Some(poison), "k", "poison"),
            (None, "k", "no event id"),
            (Some(stubborn), "k", "fail-9"),
            (Some(good), "k", "ok"),
        ],
    )
    .await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("the good one handled", Duration::from_secs(30), || async {
        (metrics.processed.get() == 1).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(metrics.dead_lettered.get(), 3);
    let dlq = test_support::kafka::read_topic(&mock.bootstrap_servers(), "orders.dlq").unwrap();
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|r| r.headers["dlq.reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].starts_with("permanent: poison payload"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("no `event_id` header"), "{reasons:?}");
    assert!(
        reasons[2].starts_with("gave up after 3 attempts"),
        "{reasons:?}"
    );
    assert_eq!(
        dlq[1].payload, b"no event id",
        "the original record is kept"
    );
    assert!(dlq.iter().all(|r| r.headers["dlq.group"] == "g"));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM effects").await,
        1,
        "failed handlers left no effects"
    );
}

/// A record sent to the DLQ leaves an inbox row: a later copy of the same event (a relay duplicate, a
/// replay — here one the handler would accept) is skipped, so one event id reaches the group's handler at
/// most once whatever happened before. Before the fix the second copy ran the handler after later events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_event_is_not_handled_again_when_it_comes_back() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 1), ("orders.dlq", 1)]);
    let (poison, later) = (Uuid::now_v7(), Uuid::now_v7());
    produce(
        &mock.bootstrap_servers(),
        &[(Some(poison), "k", "poison"), (Some(later), "k", "ok")],
    )
    .await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for(
        "the poison dead-lettered",
        Duration::from_secs(30),
        || async {
            (metrics.dead_lettered.get() == 1 && metrics.processed.get() == 1).then_some(())
        },
    )
    .await;
    // The same event again, as a relay duplicate or a replay would bring it.
    produce(&mock.bootstrap_servers(), &[(Some(poison), "k", "ok")]).await;
    wait_for("the copy skipped", Duration::from_secs(30), || async {
        (metrics.duplicates.get() >= 1).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM effects").await,
        1,
        "only the later event had an effect"
    );
    assert_eq!(metrics.dead_lettered.get(), 1);
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM inbox.inbox WHERE event_id = $1")
        .bind(poison)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "dead_lettered");
    let dlq = test_support::kafka::read_topic(&mock.bootstrap_servers(), "orders.dlq").unwrap();
    assert_eq!(dlq.len(), 1);
}

#[tokio::test]
async fn inbox_expiry_removes_old_rows_in_bounded_batches() {
    let pool = setup().await;
    sqlx::query(
        "INSERT INTO inbox.inbox (group_id, event_id, topic, \"partition\", \"offset\", processed_at) \
         SELECT 'g', gen_random_uuid(), 't', 0, n, now() - (CASE WHEN n <= 25 THEN interval '8 days' ELSE interval '1 hour' END) \
         FROM generate_series(1, 40) n",
    )
    .execute(&pool)
    .await
    .unwrap();
    let inbox = consumer_runtime::inbox::Inbox::new(SchemaName::new("inbox").unwrap());
    let removed = inbox
        .expire(&pool, Duration::from_secs(7 * 86_400), 10)
        .await
        .unwrap();
    assert_eq!(removed, 25);
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox.inbox").await, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_resumes_right_after_the_last_processed_record() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 1)]);
    let first: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let records: Vec<_> = first.iter().map(|id| (Some(*id), "k", "ok")).collect();
    produce(&mock.bootstrap_servers(), &records).await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("first ten", Duration::from_secs(30), || async {
        (metrics.processed.get() == 10).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    let second: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let records: Vec<_> = second.iter().map(|id| (Some(*id), "k", "ok")).collect();
    produce(&mock.bootstrap_servers(), &records).await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("all fifteen effects", Duration::from_secs(30), || async {
        (count(&pool, "SELECT count(*) FROM effects").await == 15).then_some(())
    })
    .await;
    // Give a wrongly committed offset time to show as re-reads.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(metrics.processed.get(), 5, "exactly the five new records");
    assert_eq!(
        metrics.duplicates.get(),
        0,
        "nothing re-read: the committed offset is the next record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_partition_share_a_transaction_and_a_failure_inside_keeps_the_others_once() {
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 1)]);
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::now_v7()).collect();
    let records: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (Some(*id), "k", if i == 150 { "fail-1" } else { "ok" }))
        .collect();
    produce(&mock.bootstrap_servers(), &records).await;
    let (metrics, stop, task) = start(&pool, config(mock.bootstrap_servers(), "g"));
    wait_for("all handled", Duration::from_secs(30), || async {
        (metrics.processed.get() == 300).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM effects").await, 300);
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT event_id) FROM effects").await,
        300
    );
    assert_eq!(
        metrics.retries.get(),
        1,
        "the failure counted as one attempt"
    );
    let text = metrics.render();
    // Fewer transactions than records: some runs held more than one record.
    let transactions = test_support::metric_value(&text, "outbox_consumer_batch_size_count");
    assert!(transactions > 0.0, "{text}");
    assert!(
        transactions < 150.0,
        "{transactions} transactions for 300 records"
    );
}

/// A coordinator that keeps refusing JoinGroup (here: `COORDINATOR_LOAD_IN_PROGRESS`, retriable, so
/// librdkafka keeps trying with the same client) leaves the member without partitions while the broker
/// answers; past the rejoin timeout the runtime replaces its client, and a settled member is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_the_coordinator_never_admits_gets_a_new_kafka_client() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let pool = setup().await;
    let mock = mock_cluster(1, &[(TOPIC, 2)]);
    mock.request_errors(
        RDKafkaApiKey::JoinGroup,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 10_000],
    );
    let mut cfg = config(mock.bootstrap_servers(), "pharmacy");
    cfg.rejoin_timeout = Duration::from_secs(4);
    let (metrics, stop, task) = start(&pool, cfg);
    wait_for(
        "the stalled client replaced",
        Duration::from_secs(30),
        || async { (metrics.client_restarts.get() >= 1).then_some(()) },
    )
    .await;
    assert_eq!(metrics.assigned_partitions.get(), 0, "never admitted");
    assert_eq!(metrics.processed.get(), 0);

    mock.clear_request_errors(RDKafkaApiKey::JoinGroup);
    let id = Uuid::now_v7();
    produce(&mock.bootstrap_servers(), &[(Some(id), "k", "ok")]).await;
    wait_for(
        "the new client consumes",
        Duration::from_secs(30),
        || async { (metrics.processed.get() == 1).then_some(()) },
    )
    .await;
    let restarts = metrics.client_restarts.get();
    // Longer than the rejoin timeout: a member that settled (here with partitions) is not replaced.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(metrics.client_restarts.get(), restarts);
    assert_eq!(metrics.assigned_partitions.get(), 2);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM effects").await,
        1,
        "one effect"
    );
}
