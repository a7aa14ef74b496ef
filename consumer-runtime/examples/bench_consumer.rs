//! `make bench-consumer`: one consumer with inbox dedup over 200,000 events (16 partitions, durable
//! PostgreSQL, fsync on), compared with a raw limit measured in the same run on the same broker: a plain
//! consumer reading the same records with no database. Also one transaction per record (batch size 1)
//! on a slice, to show what batching per partition buys. Figures, not assertions; the last line is
//! machine-readable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consumer_runtime::metrics::Metrics;
use consumer_runtime::{Handler, HandlerError, Message, Runtime, RuntimeConfig};
use futures::StreamExt;
use outbox::SchemaName;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};
use test_support::pg::{Durability, PgServer};
use tokio_util::sync::CancellationToken;

const EVENTS: usize = 200_000;
const UNBATCHED: usize = 20_000;
const PARTITIONS: i32 = 16;
const CONCURRENCY: usize = 8;
const PAYLOAD: usize = 200;

/// The application's effect is the inbox row itself: this measures the runtime, not a handler.
struct NoEffect;

impl Handler for NoEffect {
    async fn handle(
        &self,
        _msg: &Message,
        _tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn seed(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let payload = vec![b'x'; PAYLOAD];
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let key = format!("customer-{}", i % 1000);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "event_id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "event_type",
                    value: Some("OrderCreated"),
                });
            let r = BaseRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            match p.send(r) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    p.poll(Duration::from_millis(10));
                }
                Err((e, _)) => anyhow::bail!("seeding {topic}: {e}"),
            }
        }
    }
    p.flush(Duration::from_secs(60))?;
    Ok(())
}

/// Reads `n` records with a plain consumer (no database): the ceiling for this broker and machine.
async fn raw_limit(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<f64> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-raw")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .create()?;
    c.subscribe(&[topic])?;
    // The mock broker keeps about 10 MB per partition and drops the oldest records beyond that.
    let mut total = 0;
    for p in 0..PARTITIONS {
        let (lo, hi) = c.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        anyhow::ensure!(
            lo == 0,
            "the broker dropped records of {topic}/{p} (low watermark {lo})"
        );
        total += hi;
    }
    anyhow::ensure!(
        total as usize == n,
        "{total} records in {topic}, {n} expected"
    );
    let mut stream = c.stream();
    stream.next().await.expect("a record")?;
    // The clock starts at the first record: group join time is not throughput.
    let start = Instant::now();
    let mut seen = 1;
    while seen < n {
        stream.next().await.expect("a record")?;
        seen += 1;
    }
    Ok((n - 1) as f64 / start.elapsed().as_secs_f64())
}

struct Run {
    eps: f64,
    p50: Duration,
    p99: Duration,
}

async fn run_runtime(
    bootstrap: &str,
    topic: &str,
    pool: &PgPool,
    n: usize,
    batch_size: usize,
) -> anyhow::Result<Run> {
    let mut cfg = RuntimeConfig::new(format!("bench-{topic}"), vec![topic.to_owned()], bootstrap);
    cfg.batch_size = batch_size;
    cfg.concurrency = CONCURRENCY;
    let metrics = Arc::new(Metrics::default());
    let samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let s = samples.clone();
    let rt = Runtime::new(cfg, pool.clone(), NoEffect, metrics.clone())?
        .with_commit_observer(Arc::new(move |d| s.lock().unwrap().push(d)));
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { rt.run(st).await });
    // The clock starts at the first processed record: group join time is not throughput.
    while metrics.processed.get() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    let first = metrics.processed.get();
    while (metrics.processed.get() as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let eps = (metrics.processed.get() - first) as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    let mut v = samples.lock().unwrap().clone();
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Ok(Run {
        eps,
        p50: at(0.5),
        p99: at(0.99),
    })
}

async fn fresh_db(pg: &PgServer) -> anyhow::Result<PgPool> {
    let url = pg.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32 + 2)
        .connect(&url)
        .await?;
    consumer_runtime::inbox::migrate(&pool, &SchemaName::new("inbox")?).await?;
    Ok(pool)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pg = PgServer::start(Durability::Durable)?;
        let mock = test_support::kafka::mock_cluster(
            1,
            &[("bench", PARTITIONS), ("unbatched", PARTITIONS)],
        );
        let bootstrap = mock.bootstrap_servers();
        println!("seeding {EVENTS} records of {PAYLOAD} bytes over {PARTITIONS} partitions ...");
        seed(&bootstrap, "bench", EVENTS)?;
        seed(&bootstrap, "unbatched", UNBATCHED)?;

        let limit = raw_limit(&bootstrap, "bench", EVENTS).await?;
        println!("limit (plain consume, no database):  {limit:>10.0} events/s");

        let pool = fresh_db(&pg).await?;
        let one = run_runtime(&bootstrap, "unbatched", &pool, UNBATCHED, 1).await?;
        println!(
            "runtime, a transaction per record:   {:>10.0} events/s  (handler->commit p50 {:.2?}, p99 {:.2?}; {UNBATCHED} records)",
            one.eps, one.p50, one.p99
        );
        let pool = fresh_db(&pg).await?;
        let batched = run_runtime(&bootstrap, "bench", &pool, EVENTS, 500).await?;
        println!(
            "runtime, runs of up to 500 per tx:   {:>10.0} events/s  (handler->commit p50 {:.2?}, p99 {:.2?})",
            batched.eps, batched.p50, batched.p99
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox.inbox")
            .fetch_one(&pool)
            .await?;
        anyhow::ensure!(rows as usize == EVENTS, "{rows} inbox rows for {EVENTS} records");
        println!(
            "batching gain: {:.1}x; handler->commit p99 {:.1} ms",
            batched.eps / one.eps,
            batched.p99.as_secs_f64() * 1000.0
        );
        println!(
            "consumer_eps={:.0} limit_eps={limit:.0} ratio={:.2}",
            batched.eps,
            batched.eps / limit
        );
        Ok(())
    })
}
