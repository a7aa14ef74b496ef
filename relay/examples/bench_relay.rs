//! `make bench-relay`: 200,000 events of 200 bytes over 1,000 keys through PostgreSQL → relay → broker,
//! compared with two limits measured in the same run on the same servers:
//! (a) PostgreSQL alone: claim + delete in 1,000-row batches, no Kafka;
//! (b) Kafka alone: producing the same records with the relay's producer settings, no database.
//! Then commit→ack latency at a steady 1,000 events/s, and the relay binary's peak RSS.
//! Figures, not assertions: the last line is machine-readable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{NewEvent, SchemaName};
use relay::event::ClaimedEvent;
use relay::health::Health;
use relay::metrics::Metrics;
use relay::plan::{PoisonPolicy, RetryPolicy};
use relay::producer::{KafkaSettings, Partitioning, Producer};
use relay::store::{Retention, Store};
use relay::{Relay, RelayConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use test_support::pg::{Durability, PgServer};

const EVENTS: usize = 200_000;
const KEYS: usize = 1_000;
const PAYLOAD: usize = 200;
const BATCH: i64 = 1_000;
const TOPIC: &str = "bench";

fn event(i: usize) -> NewEvent {
    let key = format!("customer-{}", i % KEYS);
    let mut payload = format!("{key}:{}:", i / KEYS).into_bytes();
    payload.resize(PAYLOAD, b'x');
    NewEvent::new(TOPIC, key)
        .payload(payload)
        .event_type("OrderCreated")
}

async fn fresh_outbox(pg: &PgServer) -> anyhow::Result<(String, PgPool)> {
    let url = pg.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    outbox::migrate(&pool, outbox::DEFAULT_SCHEMA).await?;
    Ok((url, pool))
}

async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(5_000) {
        let mut tx = pool.begin().await?;
        outbox::publish_all(&mut tx, chunk.iter().map(|i| event(*i)).collect()).await?;
        tx.commit().await?;
    }
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(pool)
        .await?;
    Ok(())
}

fn kafka(brokers: String) -> KafkaSettings {
    KafkaSettings {
        brokers,
        extra: vec![],
        delivery_timeout: Duration::from_secs(30),
        linger: Duration::from_millis(1),
        max_message_bytes: 1_000_000,
        partitioning: Partitioning::Key,
    }
}

async fn limit_postgres(pg: &PgServer) -> anyhow::Result<(f64, f64)> {
    let (_, pool) = fresh_outbox(pg).await?;
    seed(&pool).await?;
    let store = Store::new(SchemaName::default());
    let busy = machine_jiffies();
    let start = Instant::now();
    let mut n = 0;
    loop {
        let mut tx = pool.begin().await?;
        let batch = store.claim(&mut tx, BATCH).await?;
        if batch.is_empty() {
            break;
        }
        n += batch.len();
        let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
        sqlx::query("DELETE FROM outbox.events WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let eps = n as f64 / start.elapsed().as_secs_f64();
    Ok((eps, cores_busy(busy, machine_jiffies())))
}

async fn limit_kafka(brokers: &str) -> anyhow::Result<(f64, f64)> {
    let producer = Producer::new(kafka(brokers.into()), Arc::new(Health::default()))?;
    let records: Vec<ClaimedEvent> = (0..EVENTS)
        .map(|i| {
            let e = event(i);
            let mut c = ClaimedEvent::for_test(i as i64, TOPIC, &e.key, e.payload);
            c.event_type = e.event_type;
            c
        })
        .collect();
    let busy = machine_jiffies();
    let start = Instant::now();
    let outcomes = producer.send_all(&records, vec![None; records.len()]).await;
    let secs = start.elapsed().as_secs_f64();
    let acked = outcomes
        .iter()
        .filter(|(d, _)| matches!(d, relay::plan::Delivery::Acked { .. }))
        .count();
    anyhow::ensure!(acked == EVENTS, "raw produce acked {acked} of {EVENTS}");
    Ok((EVENTS as f64 / secs, cores_busy(busy, machine_jiffies())))
}

/// Machine-wide (busy, total) jiffies from /proc/stat, to report how many cores a phase kept busy.
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// Cores busy between two `machine_jiffies` readings.
fn cores_busy(before: (f64, f64), after: (f64, f64)) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (after.0 - before.0) / (after.1 - before.1).max(1.0) * cores
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let field = |i: usize| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let ticks = 100.0; // USER_HZ on Linux
    (field(11) + field(12)) / ticks
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// The relay binary, as deployed, over a seeded outbox.
struct RelayRun {
    eps: f64,
    rss_mb: f64,
    relay_cores: f64,
    machine_cores: f64,
}

async fn relay_binary(pg: &PgServer, brokers: &str) -> anyhow::Result<RelayRun> {
    let (url, pool) = fresh_outbox(pg).await?;
    seed(&pool).await?;
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("outbox-relay"))
        .unwrap();
    let mut child = std::process::Command::new(&bin)
        .args([
            "run",
            "--http-addr",
            "127.0.0.1:0",
            "--batch-size",
            &BATCH.to_string(),
            "--notify",
            "false",
        ])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BOOTSTRAP", brokers)
        .env("RUST_LOG", "warn")
        .spawn()?;
    // Time from the first settled batch to the last, so process start-up is not counted.
    let (mut first, mut left_at_first, mut busy, mut relay_cpu) = (None, 0, machine_jiffies(), 0.0);
    let end = loop {
        let left = pending(&pool).await;
        if first.is_none() && left < EVENTS as i64 {
            first = Some(Instant::now());
            left_at_first = left;
            busy = machine_jiffies();
            relay_cpu = cpu_seconds(child.id());
        }
        if left == 0 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let machine_cores = cores_busy(busy, machine_jiffies());
    let rss_mb = peak_rss_mb(child.id());
    let cpu = cpu_seconds(child.id()) - relay_cpu;
    child.kill()?;
    child.wait()?;
    let wall = (end - first.expect("relay made progress")).as_secs_f64();
    Ok(RelayRun {
        eps: left_at_first as f64 / wall,
        rss_mb,
        relay_cores: cpu / wall,
        machine_cores,
    })
}

/// Commit→ack latency at a steady 1,000 events/s (10 events per transaction every 10 ms, for 10 s).
async fn latency(pg: &PgServer, brokers: &str) -> anyhow::Result<(f64, f64)> {
    let (_, pool) = fresh_outbox(pg).await?;
    outbox::install_notify_trigger(&pool, &SchemaName::default()).await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sink = samples.clone();
    let cfg = RelayConfig {
        schema: SchemaName::default(),
        batch_size: BATCH,
        poll_interval: Duration::from_millis(500),
        notify: true,
        retry: RetryPolicy {
            max_attempts: 10,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(300),
            poison: PoisonPolicy::ParkKey,
        },
        dlq: false,
        retention: Retention::Delete,
        fence_scope: "default".into(),
        max_message_bytes: 1_000_000,
    };
    let health = Arc::new(Health::default());
    let producer = Producer::new(kafka(brokers.into()), health.clone())?;
    let relay = Arc::new(
        Relay::new(
            cfg,
            pool.clone(),
            producer,
            Arc::new(Metrics::new()),
            health,
        )
        .with_ack_observer(Arc::new(move |s| sink.lock().unwrap().push(s))),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runner = {
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        tokio::spawn(async move {
            relay
                .run(&mut relay::coordinator::Competing, shutdown)
                .await
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for t in 0..1_000 {
        tick.tick().await;
        let mut tx = pool.begin().await?;
        outbox::publish_all(&mut tx, (0..10).map(|i| event(t * 10 + i)).collect()).await?;
        tx.commit().await?;
    }
    while pending(&pool).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    runner.await??;
    let mut s = samples.lock().unwrap().clone();
    s.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)] * 1000.0;
    Ok((pct(0.50), pct(0.99)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let pg = PgServer::start(Durability::Durable)?;
    let mock = test_support::kafka::mock_cluster(1, &[(TOPIC, 12)]);
    let brokers = mock.bootstrap_servers();
    println!("bench-relay: {EVENTS} events x {PAYLOAD} B over {KEYS} keys, batch {BATCH}; PostgreSQL (fsync on) + librdkafka mock broker, this machine");

    let (pg_eps, cpu_a) = limit_postgres(&pg).await?;
    println!("  limit (a) PostgreSQL claim+delete, no Kafka : {pg_eps:>9.0} events/s  (machine busy {cpu_a:.2} cores)");
    let (kafka_eps, cpu_b) = limit_kafka(&brokers).await?;
    println!("  limit (b) rdkafka produce, no database      : {kafka_eps:>9.0} events/s  (machine busy {cpu_b:.2} cores)");
    let run = relay_binary(&pg, &brokers).await?;
    let limit = pg_eps.min(kafka_eps);
    let ratio = run.eps / limit;
    println!(
        "  relay (outbox-relay binary)                 : {:>9.0} events/s  (machine busy {:.2} cores, relay process {:.2})",
        run.eps, run.machine_cores, run.relay_cores
    );
    println!("  ratio relay / min(a, b)                     : {ratio:>9.2}  (targets: ratio >= 0.70, relay >= 50000 events/s)");
    println!(
        "  relay peak RSS                              : {:>9.1} MB (target <= 32)",
        run.rss_mb
    );
    let (p50, p99) = latency(&pg, &brokers).await?;
    println!("  commit->ack at 1000 events/s                : p50 {p50:.1} ms, p99 {p99:.1} ms (target p99 <= 25)");
    println!(
        "relay_eps={:.0} limit_eps={limit:.0} ratio={ratio:.2} p99_ms={p99:.1} rss_mb={:.1}",
        run.eps, run.rss_mb
    );
    Ok(())
}
