//! Shared harness for relay tests: a fresh database, a mock cluster, an in-process relay or the binary.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outbox::{NewEvent, SchemaName};
use relay::coordinator::Competing;
use relay::decide::{PoisonPolicy, RetryPolicy};
use relay::health::Health;
use relay::metrics::Metrics;
use relay::producer::{KafkaSettings, Partitioning, Producer};
use relay::store::Retention;
use relay::{Relay, RelayConfig};
use sqlx::PgPool;
use test_support::kafka::Record;

pub const TOPIC: &str = "orders";

pub fn config() -> RelayConfig {
    RelayConfig {
        schema: SchemaName::default(),
        batch_size: 500,
        poll_interval: Duration::from_millis(50),
        notify: true,
        retry: RetryPolicy {
            max_attempts: 50,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            poison: PoisonPolicy::ParkKey,
        },
        dlq: false,
        retention: Retention::Delete,
        fence_scope: "default".into(),
        max_message_bytes: 1_000_000,
        in_flight_batches: 2,
    }
}

pub fn kafka(brokers: String) -> KafkaSettings {
    KafkaSettings {
        brokers,
        extra: vec![],
        delivery_timeout: Duration::from_secs(10),
        linger: Duration::from_millis(2),
        max_message_bytes: 1_000_000,
        partitioning: Partitioning::Key,
    }
}

pub struct InProcess {
    pub relay: Arc<Relay>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

pub fn in_process(pool: &PgPool, cfg: RelayConfig, kafka: KafkaSettings) -> InProcess {
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new());
    let producer = Producer::new(kafka, health.clone()).unwrap();
    let relay = Arc::new(Relay::new(
        cfg,
        pool.clone(),
        producer,
        metrics.clone(),
        health.clone(),
    ));
    InProcess {
        relay,
        health,
        metrics,
    }
}

/// Runs batches until one claims nothing.
pub async fn drain(relay: &Relay) -> usize {
    let mut total = 0;
    loop {
        let r = relay.run_batch(None).await.unwrap();
        total += r.delivered;
        if r.claimed == 0 {
            return total;
        }
    }
}

/// Spawns `relay.run` with a competing coordinator until `shutdown`.
pub fn spawn_run(
    relay: Arc<Relay>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = Competing;
        relay.run(&mut c, shutdown).await.unwrap();
    })
}

pub async fn migrated_db() -> test_support::pg::TestDb {
    let db = test_support::pg::fresh_db().await;
    outbox::migrate(&db.pool, "outbox").await.unwrap();
    outbox::install_notify_trigger(&db.pool, &SchemaName::default())
        .await
        .unwrap();
    db
}

/// Inserts `n` events over `keys` keys; payload `"<key>:<seq>"` with seq increasing per key.
pub async fn insert_events(pool: &PgPool, keys: usize, n: usize, start_seq: usize) {
    let mut tx = pool.begin().await.unwrap();
    let events: Vec<_> = (0..n)
        .map(|i| {
            let key = format!("key-{}", i % keys);
            let seq = start_seq + i / keys;
            NewEvent::new(TOPIC, key.clone()).payload(format!("{key}:{seq}").into_bytes())
        })
        .collect();
    for chunk in events.chunks(1000) {
        outbox::publish_all(&mut tx, chunk.to_vec()).await.unwrap();
    }
    tx.commit().await.unwrap();
}

pub async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

pub fn read(bootstrap: &str, topic: &str) -> Vec<Record> {
    test_support::kafka::read_topic(bootstrap, topic).unwrap()
}

/// What a topic holds, checked against the delivery contract.
#[derive(Debug)]
pub struct Ledger {
    pub records: usize,
    pub distinct: usize,
    pub duplicates: usize,
}

/// Checks: every record's key stays on one partition; per key, an event never appears for the first
/// time after a later one (duplicates of already-seen events are allowed and counted).
pub fn check_order(records: &[Record]) -> Ledger {
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut max_seq: HashMap<String, u64> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut duplicates = 0;
    for r in records {
        let key = r.key.clone().expect("records have keys");
        let p = *partition_of.entry(key.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition, "key {key} spread over partitions");
        let event_id = r.headers.get("event_id").expect("event_id header").clone();
        let payload = String::from_utf8(r.payload.clone()).unwrap();
        let seq: u64 = payload.rsplit(':').next().unwrap().parse().unwrap();
        if !seen.insert(event_id) {
            duplicates += 1;
            continue;
        }
        let max = max_seq.entry(key.clone()).or_insert(0);
        assert!(
            seq >= *max,
            "key {key}: event {seq} first appeared after {max}"
        );
        *max = seq;
    }
    Ledger {
        records: records.len(),
        distinct: seen.len(),
        duplicates,
    }
}

/// The relay binary as a child process.
pub fn spawn_binary(db_url: &str, brokers: &str, http_port: u16, extra: &[&str]) -> Child {
    spawn_binary_with_env(db_url, brokers, http_port, extra, &[])
}

/// [`spawn_binary`] with extra environment variables.
pub fn spawn_binary_with_env(
    db_url: &str,
    brokers: &str,
    http_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .envs(env.iter().copied())
        .args([
            "run",
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--poll-interval",
            "50ms",
        ])
        .args(extra)
        .env("DATABASE_URL", db_url)
        .env("KAFKA_BOOTSTRAP", brokers)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outbox-relay")
}

/// Everything the child wrote to stderr (after it has exited).
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// Asserts the child is still running after `wait` (it retries instead of crashing), kills it and
/// returns its stderr.
pub async fn still_running_after(mut child: Child, wait: Duration) -> String {
    tokio::time::sleep(wait).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited instead of retrying: {}",
        stderr_of(&mut child)
    );
    sigkill(&mut child);
    stderr_of(&mut child)
}

pub fn sigkill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

#[allow(unused_imports)] // not every test binary reads metrics
pub use test_support::metric_value as metric;
