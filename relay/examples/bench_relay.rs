//! `make bench-relay`: 200,000 events of 200 bytes over 1,000 keys through PostgreSQL → relay → broker,
//! compared with two limits measured in the same run on the same servers under the same latency:
//! (a) PostgreSQL alone: claim + delete in 1,000-row batches, no Kafka;
//! (b) Kafka alone: producing the same records with the relay's producer settings, no database.
//! Three conditions: loopback; the broker 5 ms away (the mock cluster's round-trip time, about what a
//! replicated `acks=all` produce takes); PostgreSQL 1 ms away (a delay proxy in front of it). The relay runs
//! with 1, 2 and 4 batches in flight in each. Then commit→ack latency at a steady 1,000 events/s, and the
//! relay binary's peak RSS. CPU per event is reported by process (relay, PostgreSQL, this process: the
//! mock broker and the proxy), and PostgreSQL's own per-statement times (`pg_stat_statements`) for limit (a)
//! and for the relay at the default depth. Figures, not assertions: one machine-readable line per condition
//! and depth, one per statement.
//!
//! A hot-key workload (the same events over 20 keys) runs at the default depth beside the 1,000-key one in
//! each condition: a batch never carries a key an earlier batch still has in flight, so few keys leave
//! the pipeline less to overlap; the two figures side by side are that rule's cost.
//!
//! Environment: `BENCH_CONDITIONS` (comma-separated names, default all), `BENCH_DEPTHS` (default 1,2,4,8),
//! `BENCH_HOT_KEYS` (default 20; 0 skips the hot-key runs), `RELAY_BIN` (another `outbox-relay` binary,
//! e.g. an older build, for before/after figures).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{NewEvent, SchemaName};
use relay::decide::{PoisonPolicy, RetryPolicy};
use relay::event::ClaimedEvent;
use relay::health::Health;
use relay::metrics::Metrics;
use relay::producer::{KafkaSettings, Partitioning, Producer};
use relay::store::{Retention, Store};
use relay::{Relay, RelayConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use test_support::delay_proxy::DelayProxy;
use test_support::kafka::Mock;
use test_support::pg::{Durability, PgServer};

const EVENTS: usize = 200_000;
const KEYS: usize = 1_000;
const PAYLOAD: usize = 200;
const BATCH: i64 = 1_000;
const TOPIC: &str = "bench";
const DEPTHS: [u16; 4] = [1, 2, 4, 8];
/// The relay's default `--in-flight-batches` (the summary line reports it).
const DEFAULT_DEPTH: u16 = 8;

fn event(i: usize, keys: usize) -> NewEvent {
    let key = format!("customer-{}", i % keys);
    let mut payload = format!("{key}:{}:", i / keys).into_bytes();
    payload.resize(PAYLOAD, b'x');
    NewEvent::new(TOPIC, key)
        .payload(payload)
        .event_type("OrderCreated")
}

/// Network latency added to one side.
#[derive(Clone, Copy)]
struct Condition {
    name: &'static str,
    broker_rtt: Duration,
    database_rtt: Duration,
}

const CONDITIONS: [Condition; 3] = [
    Condition {
        name: "loopback",
        broker_rtt: Duration::ZERO,
        database_rtt: Duration::ZERO,
    },
    Condition {
        name: "broker_rtt_5ms",
        broker_rtt: Duration::from_millis(5),
        database_rtt: Duration::ZERO,
    },
    Condition {
        name: "database_rtt_1ms",
        broker_rtt: Duration::ZERO,
        database_rtt: Duration::from_millis(1),
    },
];

/// The servers of the run: PostgreSQL with a seeded template database, the mock broker.
struct Bed {
    pg: PgServer,
    mock: Mock,
    /// The seeded template databases: over [`KEYS`] keys, and over the hot keys (when run).
    template: String,
    hot_template: Option<(usize, String)>,
}

impl Bed {
    /// A copy of the seeded outbox (`CREATE DATABASE … TEMPLATE`: a file copy, not 200,000 inserts),
    /// reached through `proxy` when the condition puts the database farther away.
    async fn outbox(&self, proxy: Option<&DelayProxy>) -> anyhow::Result<Outbox> {
        self.outbox_from(&self.template, proxy).await
    }

    /// [`Bed::outbox`] from another template.
    async fn outbox_from(
        &self,
        template: &str,
        proxy: Option<&DelayProxy>,
    ) -> anyhow::Result<Outbox> {
        let direct = self.pg.create_database().await?;
        let name = direct.rsplit('/').next().unwrap_or_default().to_owned();
        let mut admin = sqlx::PgConnection::connect(&self.pg.url("postgres")).await?;
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let url = match proxy {
            Some(p) => format!("postgres://postgres@{}/{name}", p.addr()),
            None => direct,
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await?;
        Ok(Outbox { name, url, pool })
    }

    /// Forgets the statement times collected so far (every database of the server).
    async fn reset_statements(&self) -> anyhow::Result<()> {
        let mut admin = sqlx::PgConnection::connect(&self.pg.url("postgres")).await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut admin)
            .await?;
        Ok(())
    }

    /// The statements run in database `name` since the last reset, most total time first.
    async fn statements(&self, name: &str) -> anyhow::Result<Vec<Statement>> {
        let mut admin = sqlx::PgConnection::connect(&self.pg.url("postgres")).await?;
        let rows: Vec<(String, i64, f64, i64)> = sqlx::query_as(
            "SELECT s.query, s.calls, s.total_exec_time, s.rows FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 AND s.calls > 0 \
             ORDER BY s.total_exec_time DESC LIMIT 8",
        )
        .bind(name)
        .fetch_all(&mut admin)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(query, calls, total_ms, rows)| Statement {
                query: query.split_whitespace().collect::<Vec<_>>().join(" "),
                calls,
                total_ms,
                rows,
            })
            .collect())
    }
}

/// A copy of the seeded outbox: its database name, the URL the relay uses, a pool for checks.
struct Outbox {
    name: String,
    url: String,
    pool: PgPool,
}

/// One normalised statement's figures from `pg_stat_statements`.
struct Statement {
    query: String,
    calls: i64,
    total_ms: f64,
    rows: i64,
}

/// Prints each statement's execution time per relayed event (server side: planning, locks and
/// execution; not the round trip), one machine-readable line each.
fn print_statements(phase: &str, condition: &str, statements: &[Statement], events: f64) {
    let total: f64 = statements.iter().map(|s| s.total_ms).sum();
    println!(
        "    pg_stat_statements ({phase}): {:.1} us of statement time per event",
        total / events * 1000.0
    );
    for s in statements {
        let short: String = s.query.chars().take(90).collect();
        println!(
            "      {:>6.2} us/event  {:>7} calls  {:>7.3} ms/call  {:>8} rows  {short}",
            s.total_ms / events * 1000.0,
            s.calls,
            s.total_ms / s.calls as f64,
            s.rows
        );
        println!(
            "statement phase={phase} condition={condition} us_per_event={:.2} calls={} ms_per_call={:.3} rows={} query={:?}",
            s.total_ms / events * 1000.0,
            s.calls,
            s.total_ms / s.calls as f64,
            s.rows,
            short
        );
    }
}

async fn seed_template(pg: &PgServer, keys: usize) -> anyhow::Result<String> {
    let url = pg.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    outbox::migrate(&pool, outbox::DEFAULT_SCHEMA).await?;
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(5_000) {
        let mut tx = pool.begin().await?;
        outbox::publish_all(&mut tx, chunk.iter().map(|i| event(*i, keys)).collect()).await?;
        tx.commit().await?;
    }
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(url.rsplit('/').next().unwrap_or_default().to_owned())
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

/// What one phase cost: events per second and CPU per event by process.
#[derive(Default, Clone, Copy)]
struct Figures {
    eps: f64,
    machine_cores: f64,
    cpu: Cpu,
}

impl Figures {
    fn cpu_text(&self, events: f64) -> String {
        let us = |s: f64| s / events * 1e6;
        format!(
            "cpu/event: relay {:.1} us, postgres {:.1} us, bench+broker {:.1} us",
            us(self.cpu.relay),
            us(self.cpu.postgres),
            us(self.cpu.bench)
        )
    }
}

async fn limit_postgres(
    bed: &Bed,
    proxy: Option<&DelayProxy>,
) -> anyhow::Result<(Figures, Vec<Statement>)> {
    let Outbox { name, pool, .. } = bed.outbox(proxy).await?;
    bed.reset_statements().await?;
    let store = Store::new(SchemaName::default());
    let meter = Meter::start(None);
    let start = Instant::now();
    let mut n = 0;
    loop {
        let mut tx = pool.begin().await?;
        let batch = store
            .claim(&mut tx, BATCH, &relay::store::Claim::from_start())
            .await?;
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
    let (machine_cores, cpu) = meter.stop();
    let eps = n as f64 / start.elapsed().as_secs_f64();
    let statements = bed.statements(&name).await?;
    Ok((
        Figures {
            eps,
            machine_cores,
            cpu,
        },
        statements,
    ))
}

async fn limit_kafka(brokers: &str) -> anyhow::Result<Figures> {
    let producer = Producer::new(kafka(brokers.into()), Arc::new(Health::default()))?;
    let records: Vec<ClaimedEvent> = (0..EVENTS)
        .map(|i| {
            let e = event(i, KEYS);
            let mut c = ClaimedEvent::for_test(i as i64, TOPIC, &e.key, e.payload);
            c.event_type = e.event_type;
            c
        })
        .collect();
    let meter = Meter::start(None);
    let start = Instant::now();
    let outcomes = producer.send_all(&records, vec![None; records.len()]).await;
    let secs = start.elapsed().as_secs_f64();
    let (machine_cores, cpu) = meter.stop();
    let acked = outcomes
        .iter()
        .filter(|(d, _)| matches!(d, relay::decide::Delivery::Acked { .. }))
        .count();
    anyhow::ensure!(acked == EVENTS, "raw produce acked {acked} of {EVENTS}");
    Ok(Figures {
        eps: EVENTS as f64 / secs,
        machine_cores,
        cpu,
    })
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

/// (command name, CPU seconds used so far) of a process, from /proc/PID/stat.
fn process_cpu(pid: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 overall.
    let field = |i: usize| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let ticks = 100.0; // USER_HZ on Linux
    Some((comm, (field(11) + field(12)) / ticks))
}

/// CPU seconds by process group: the relay binary, every PostgreSQL process, and this process (the
/// in-process mock broker, the delay proxy, the load driver).
#[derive(Default, Clone, Copy)]
struct Cpu {
    relay: f64,
    postgres: f64,
    bench: f64,
}

impl Cpu {
    fn now(relay_pid: Option<u32>) -> Self {
        let mut cpu = Cpu::default();
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().to_string();
            if !pid.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            let Some((comm, secs)) = process_cpu(&pid) else {
                continue;
            };
            if comm == "postgres" {
                cpu.postgres += secs;
            } else if pid == me {
                cpu.bench += secs;
            } else if relay_pid.is_some_and(|r| r.to_string() == pid) {
                cpu.relay += secs;
            }
        }
        cpu
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            relay: self.relay - before.relay,
            postgres: self.postgres - before.postgres,
            bench: self.bench - before.bench,
        }
    }
}

/// Machine and per-process CPU between `start` and `stop`. PostgreSQL backends that exit in between
/// (the relay's pool closing) take their CPU time with them: the figures are lower bounds.
struct Meter {
    relay: Option<u32>,
    machine: (f64, f64),
    cpu: Cpu,
}

impl Meter {
    fn start(relay: Option<u32>) -> Self {
        Self {
            relay,
            machine: machine_jiffies(),
            cpu: Cpu::now(relay),
        }
    }

    fn stop(&self) -> (f64, Cpu) {
        (
            cores_busy(self.machine, machine_jiffies()),
            Cpu::now(self.relay).since(self.cpu),
        )
    }
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

/// `outbox_relay_published_total` of the relay on `port` (a scrape costs far less than counting the
/// outbox, which would put a sequential scan into every measurement).
async fn published(http: &reqwest::Client, port: u16) -> Option<f64> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(test_support::metric_value(
        &text,
        "outbox_relay_published_total",
    ))
}

/// The relay binary, as deployed, over a copy of the seeded outbox.
struct RelayRun {
    figures: Figures,
    events: f64,
    rss_mb: f64,
    statements: Vec<Statement>,
}

async fn relay_binary(
    bed: &Bed,
    template: &str,
    proxy: Option<&DelayProxy>,
    in_flight: u16,
) -> anyhow::Result<RelayRun> {
    let Outbox { name, url, pool } = bed.outbox_from(template, proxy).await?;
    let bin = match std::env::var_os("RELAY_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("outbox-relay"))
            .unwrap(),
    };
    bed.reset_statements().await?;
    let port = test_support::free_port();
    let mut child = std::process::Command::new(&bin)
        .args([
            "run",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--batch-size",
            &BATCH.to_string(),
            "--in-flight-batches",
            &in_flight.to_string(),
            "--notify",
            "false",
        ])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BOOTSTRAP", bed.mock.bootstrap_servers())
        .env("RUST_LOG", "warn")
        .spawn()?;
    let http = reqwest::Client::new();
    // Time from the first settled batch to the last, so process start-up is not counted.
    let (mut first, mut meter) = (None, Meter::start(Some(child.id())));
    let deadline = Instant::now() + Duration::from_secs(600);
    let (end, at_first) = loop {
        let done = published(&http, port).await.unwrap_or(0.0);
        if first.is_none() && done > 0.0 {
            first = Some((Instant::now(), done));
            meter = Meter::start(Some(child.id()));
        }
        if done >= EVENTS as f64 {
            break (Instant::now(), first.map_or(0.0, |f| f.1));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (machine_cores, cpu) = meter.stop();
    let rss_mb = peak_rss_mb(child.id());
    child.kill()?;
    child.wait()?;
    // Read before the check below adds its own statement.
    let statements = bed.statements(&name).await?;
    anyhow::ensure!(
        pending(&pool).await == 0,
        "events left after the relay reported them all"
    );
    let wall = (end - first.expect("relay made progress").0).as_secs_f64();
    let events = EVENTS as f64 - at_first;
    Ok(RelayRun {
        figures: Figures {
            eps: events / wall,
            machine_cores,
            cpu,
        },
        events,
        rss_mb,
        statements,
    })
}

/// Commit→ack latency at a steady 1,000 events/s (10 events per transaction every 10 ms, for 10 s).
async fn latency(pg: &PgServer, brokers: &str) -> anyhow::Result<(f64, f64)> {
    let url = pg.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    outbox::migrate(&pool, outbox::DEFAULT_SCHEMA).await?;
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
        in_flight_batches: DEFAULT_DEPTH.into(),
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
        outbox::publish_all(&mut tx, (0..10).map(|i| event(t * 10 + i, KEYS)).collect()).await?;
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

/// Median of 50 `SELECT 1` round trips through `url` (what the condition really added).
async fn database_rtt_ms(url: &str) -> anyhow::Result<f64> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut t = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        t.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let pg = PgServer::start_with_settings(
        Durability::Durable,
        &["shared_preload_libraries=pg_stat_statements"],
    )?;
    let only = |var: &str| -> Option<Vec<String>> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
    };
    let conditions: Vec<Condition> = match only("BENCH_CONDITIONS") {
        Some(names) => CONDITIONS
            .into_iter()
            .filter(|c| names.iter().any(|n| n == c.name))
            .collect(),
        None => CONDITIONS.to_vec(),
    };
    let depths: Vec<u16> = match only("BENCH_DEPTHS") {
        Some(list) => list
            .iter()
            .map(|d| d.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("BENCH_DEPTHS: {e}"))?,
        None => DEPTHS.to_vec(),
    };
    let hot_keys: usize = match std::env::var("BENCH_HOT_KEYS") {
        Ok(v) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("BENCH_HOT_KEYS: {e}"))?,
        Err(_) => 20,
    };
    let mock = test_support::kafka::mock_cluster(1, &[(TOPIC, 12)]);
    let template = seed_template(&pg, KEYS).await?; // waits until the server accepts queries
    let hot_template = match hot_keys {
        0 => None,
        n => Some((n, seed_template(&pg, n).await?)),
    };
    {
        let mut admin = sqlx::PgConnection::connect(&pg.url("postgres")).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut admin)
            .await?;
    }
    let bed = Bed {
        pg,
        mock,
        template,
        hot_template,
    };
    let brokers = bed.mock.bootstrap_servers();
    println!("bench-relay: {EVENTS} events x {PAYLOAD} B over {KEYS} keys, batch {BATCH}; PostgreSQL (fsync on) + librdkafka mock broker, this machine");
    let mut loopback_best = None;
    for c in conditions {
        bed.mock.broker_round_trip_time(1, c.broker_rtt)?;
        let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", bed.pg.port()).parse()?;
        let proxy = (!c.database_rtt.is_zero())
            .then(|| DelayProxy::start(pg_addr, c.database_rtt / 2))
            .transpose()?;
        let rtt = match &proxy {
            Some(p) => {
                database_rtt_ms(&format!("postgres://postgres@{}/postgres", p.addr())).await?
            }
            None => database_rtt_ms(&bed.pg.url("postgres")).await?,
        };
        println!(
            "condition {}: broker round trip +{:?}, database round trip {rtt:.2} ms (SELECT 1, median)",
            c.name, c.broker_rtt
        );
        let (a, statements) = limit_postgres(&bed, proxy.as_ref()).await?;
        println!(
            "  limit (a) PostgreSQL claim+delete, no Kafka : {:>9.0} events/s  (machine busy {:.2} cores; {})",
            a.eps, a.machine_cores, a.cpu_text(EVENTS as f64)
        );
        print_statements("limit_a", c.name, &statements, EVENTS as f64);
        let b = limit_kafka(&brokers).await?;
        println!(
            "  limit (b) rdkafka produce, no database      : {:>9.0} events/s  (machine busy {:.2} cores; {})",
            b.eps, b.machine_cores, b.cpu_text(EVENTS as f64)
        );
        let limit = a.eps.min(b.eps);
        let mut default_eps = None;
        for &depth in &depths {
            let run = relay_binary(&bed, &bed.template, proxy.as_ref(), depth).await?;
            let f = run.figures;
            let ratio = f.eps / limit;
            println!(
                "  relay, {depth} in flight                      : {:>9.0} events/s  ratio {ratio:.2}  (machine busy {:.2} cores; {}; peak RSS {:.1} MB)",
                f.eps, f.machine_cores, f.cpu_text(run.events), run.rss_mb
            );
            println!(
                "condition={} in_flight={depth} relay_eps={:.0} limit_eps={limit:.0} ratio={ratio:.2} \
                 relay_us_per_event={:.1} postgres_us_per_event={:.1} bench_us_per_event={:.1} rss_mb={:.1}",
                c.name,
                f.eps,
                f.cpu.relay / run.events * 1e6,
                f.cpu.postgres / run.events * 1e6,
                f.cpu.bench / run.events * 1e6,
                run.rss_mb
            );
            if depth == DEFAULT_DEPTH {
                print_statements("relay", c.name, &run.statements, EVENTS as f64);
                default_eps = Some(f.eps);
            }
            if c.name == "loopback" && depth == DEFAULT_DEPTH {
                loopback_best = Some((f.eps, ratio, run.rss_mb));
            }
        }
        if let Some((keys, template)) = &bed.hot_template {
            let run = relay_binary(&bed, template, proxy.as_ref(), DEFAULT_DEPTH).await?;
            let f = run.figures;
            let against = default_eps
                .map(|d| format!("{:.2} of the {KEYS}-key figure", f.eps / d))
                .unwrap_or_default();
            println!(
                "  relay, {DEFAULT_DEPTH} in flight, {keys} hot keys           : {:>9.0} events/s  ratio {:.2}  {against}",
                f.eps,
                f.eps / limit
            );
            println!(
                "condition={} in_flight={DEFAULT_DEPTH} keys={keys} relay_eps={:.0} limit_eps={limit:.0} ratio={:.2} vs_{KEYS}_keys={:.2}",
                c.name,
                f.eps,
                f.eps / limit,
                default_eps.map_or(f64::NAN, |d| f.eps / d)
            );
        }
    }
    bed.mock.broker_round_trip_time(1, Duration::ZERO)?;
    let (p50, p99) = latency(&bed.pg, &brokers).await?;
    println!("  commit->ack at 1000 events/s ({DEFAULT_DEPTH} in flight) : p50 {p50:.1} ms, p99 {p99:.1} ms (target p99 <= 25)");
    let (eps, ratio, rss) = loopback_best.unwrap_or_default();
    println!("targets: loopback ratio >= 0.70 and >= 50000 events/s, broker_rtt_5ms ratio >= 0.60, database_rtt_1ms ratio >= 0.50, RSS <= 32 MB");
    println!("relay_eps={eps:.0} ratio={ratio:.2} p99_ms={p99:.1} rss_mb={rss:.1}");
    Ok(())
}
