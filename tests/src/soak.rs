//! The chaos soak: the demo stack (API, two relays, pharmacy ×2, notification ×1) under a steady order
//! load while a seeded driver injects faults one after another ([`crate::chaos`]), restarting whatever it
//! killed as Kubernetes would; then a ledger read from the database proves nothing was lost, nothing
//! applied twice and every key's effects kept the commit order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;
use serde_json::json;
use sqlx::PgPool;
use test_support::pg::Durability;

use crate::chaos::{Bounds, Fault, Schedule};
use crate::ledger::{latency_ms, ledger, Ledger};
use crate::stack::{Kafka, Options, Stack};

/// How the two relays share the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordination {
    /// A Kubernetes Lease on the test bed's control plane (started by the soak).
    Lease,
    /// PostgreSQL advisory lock (no Kubernetes).
    Single,
    /// Lease when the control plane's binaries are there, else single.
    Auto,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Orders to post.
    pub orders: usize,
    /// Seed of the fault schedule (printed; the same seed replays the same schedule).
    pub seed: u64,
    /// Orders per second the load aims at (all workers together).
    pub rate: f64,
    /// Load workers; each owns its customers (keys) and posts their orders one after another, so each
    /// key's commit order is the order the worker posted them.
    pub workers: usize,
    /// Customers per worker.
    pub keys_per_worker: usize,
    /// Faults at least (the run goes on past the load until this many were injected).
    pub min_faults: usize,
    /// Quiet time between faults and fault lengths.
    pub bounds: Bounds,
    /// Relay coordination.
    pub coordination: Coordination,
    /// How long the pipeline may take to drain once the load and the faults are over.
    pub settle_timeout: Duration,
    /// Print every process's log lines.
    pub echo: bool,
    /// The broker: Apache Kafka (three nodes: a broker fault kills or pauses one of them, the long outage
    /// two) or tansu behind a proxy that cuts every connection.
    pub kafka: Kafka,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            orders: 100_000,
            seed: 1,
            rate: 400.0,
            workers: 8,
            keys_per_worker: 8,
            min_faults: Fault::ALL.len(),
            bounds: Bounds {
                min_wait: Duration::from_secs(2),
                max_wait: Duration::from_secs(8),
                max_hold: Duration::from_secs(3),
            },
            coordination: Coordination::Auto,
            settle_timeout: Duration::from_secs(240),
            echo: false,
            kafka: Kafka::Apache(3),
        }
    }
}

/// Lease timings of the soak's relays (short, so a paused or killed leader is replaced in seconds).
pub const LEASE_DURATION: Duration = Duration::from_secs(3);

/// What the soak saw. [`Report::violations`] is empty when every guarantee held.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed of the schedule.
    pub seed: u64,
    /// `lease` or `single`.
    pub coordination: &'static str,
    /// Orders committed (rows in `shop.orders`, including the ones whose API crashed after the commit).
    pub orders: i64,
    /// Committed orders missing an effect in a group, or whose event was never published.
    pub lost: i64,
    /// Orders missing an effect, per group (pharmacy, notification).
    pub missing_effects: (i64, i64),
    /// Orders with more than one effect in a group.
    pub duplicate_effects: i64,
    /// Effects applied out of their key's commit order (pairs, over both groups).
    pub order_violations: i64,
    /// `outbox_relay_order_violations_total` over every relay process (scraped before each relay kill and
    /// at the end): acknowledgments after a failure of their key.
    pub relay_order_violations: u64,
    /// What the orders topic holds against what the outbox wrote ([`test_support::history`]): events
    /// that appeared for the first time after a later event of their key.
    pub topic_inversions: usize,
    /// Events written (archive, pending or dead) never found on the orders topic.
    pub topic_lost: usize,
    /// Poison steps in which the parked key's later event went out before its dead head was discarded.
    pub poison_overtakes: u64,
    /// Orders the API acknowledged with 201.
    pub acknowledged: i64,
    /// Acknowledged orders that are not in the database (counted in `lost` too).
    pub acknowledged_missing: i64,
    /// Committed orders whose event is not in the archive (never acknowledged by Kafka).
    pub unpublished: i64,
    /// Events still pending in `outbox.events` after the drain.
    pub pending: i64,
    /// Events in `outbox.dead` (no event of this load may be dead).
    pub dead: i64,
    /// Times the fence epoch was seen lower than before.
    pub epoch_regressions: i64,
    /// The last fence epoch seen.
    pub last_epoch: i64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u32>,
    /// Redeliveries the consumers' inboxes skipped (scraped before each consumer kill and at the end).
    pub duplicates_absorbed: u64,
    /// Batches a paused leader could not commit after it resumed: refused by the fence or rolled back
    /// when it noticed the lost Lease (`outbox_relay_batch_errors_total{reason="fenced"|"lost"}`).
    pub fence_refusals: u64,
    /// Longest time from a leader kill or pause under load to the next publish.
    pub max_failover_gap_ms: f64,
    /// Processes that exited without the driver killing them (restarted, as Kubernetes would), by name.
    pub unexpected_exits: BTreeMap<String, u32>,
    /// Orders committed by an API that then exited (`crash=after-commit`).
    pub crash_commits: i64,
    /// Order requests the load retried (API down, database restarting).
    pub retried_requests: u64,
    /// p99 of order commit → effect commit, both groups.
    pub p99_ms: f64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// The machine-readable line.
    pub fn line(&self) -> String {
        let total: u32 = self.faults.values().sum();
        let by_kind: Vec<String> = Fault::ALL
            .iter()
            .map(|k| format!("{k}={}", self.faults.get(k).copied().unwrap_or(0)))
            .collect();
        let exits: Vec<String> = self
            .unexpected_exits
            .iter()
            .map(|(n, c)| format!("{n}={c}"))
            .collect();
        format!(
            "orders={} acknowledged={} lost={} missing_effects=pharmacy:{},notification:{} duplicate_effects={} \
             order_violations={} relay_order_violations={} topic_inversions={} topic_lost={} poison_overtakes={} faults={total} ({}) \
             duplicates_absorbed={} p99_ms={:.1} unpublished={} pending={} dead={} epoch_regressions={} \
             last_epoch={} fence_refusals={} max_failover_gap_ms={:.0} unexpected_exits={} retried_requests={} \
             coordination={} seed={} elapsed_s={:.0}",
            self.orders,
            self.acknowledged,
            self.lost,
            self.missing_effects.0,
            self.missing_effects.1,
            self.duplicate_effects,
            self.order_violations,
            self.relay_order_violations,
            self.topic_inversions,
            self.topic_lost,
            self.poison_overtakes,
            by_kind.join(","),
            self.duplicates_absorbed,
            self.p99_ms,
            self.unpublished,
            self.pending,
            self.dead,
            self.epoch_regressions,
            self.last_epoch,
            self.fence_refusals,
            self.max_failover_gap_ms,
            if exits.is_empty() { "0".into() } else { exits.join(",") },
            self.retried_requests,
            self.coordination,
            self.seed,
            self.elapsed.as_secs_f64(),
        )
    }

    /// Every broken guarantee, in words.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let checks = [
            (
                self.lost,
                "committed orders lost (an effect missing or never published)",
            ),
            (self.duplicate_effects, "orders with a duplicate effect"),
            (
                self.order_violations,
                "effects out of their key's commit order",
            ),
            (
                self.relay_order_violations as i64,
                "acknowledgments after a failure of their key (outbox_relay_order_violations_total)",
            ),
            (
                self.topic_inversions as i64,
                "events first on the topic after a later event of their key",
            ),
            (self.topic_lost as i64, "written events missing from the topic"),
            (
                self.poison_overtakes as i64,
                "parked keys whose later event overtook the dead head",
            ),
            (self.pending, "events still pending after the drain"),
            (self.dead, "events dead-lettered"),
            (self.epoch_regressions, "fence epoch went backwards"),
        ];
        for (n, what) in checks {
            if n != 0 {
                v.push(format!("{n} {what}"));
            }
        }
        v
    }
}

/// Runs the soak and returns its report (an error only when the stack itself cannot be run).
pub async fn run(opts: SoakOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let started_unix = unix_now();
    let (plane, coordination) = control_plane(opts.coordination).await?;
    // Short delivery timeout and few attempts: a `long_broker_outage` lasts longer than attempts ×
    // (delivery timeout + backoff), so counting the broker's faults would dead-letter the backlog. A
    // small record limit makes `poison_redrive_discard`'s event undeliverable.
    let mut relay_args: Vec<String> = [
        "--standby-ready",
        "true",
        "--delivery-timeout",
        "2s",
        "--max-attempts",
        "3",
        "--backoff-base",
        "200ms",
        "--backoff-max",
        "1s",
        "--max-message-bytes",
        "200000",
    ]
    .map(String::from)
    .to_vec();
    let mut relay_env = Vec::new();
    match &plane {
        Some(plane) => {
            let ns = plane.namespace("soak").await;
            relay_args.extend(
                [
                    "--coordination",
                    "lease",
                    "--lease-name",
                    "soak-relay",
                    "--lease-duration",
                    &format!("{}s", LEASE_DURATION.as_secs()),
                    "--renew-deadline",
                    "2s",
                    "--retry-period",
                    "250ms",
                ]
                .map(String::from),
            );
            relay_env.push((
                "KUBECONFIG".into(),
                plane.kubeconfig().display().to_string(),
            ));
            relay_env.push(("POD_NAMESPACE".into(), ns));
        }
        None => relay_args
            .extend(["--coordination", "single", "--lock-retry", "250ms"].map(String::from)),
    }
    let mut stack = Stack::start(Options {
        allow_crash: true,
        echo: opts.echo,
        relays: 2,
        relay_args,
        relay_env,
        durability: Durability::SurvivesServerCrash,
        kafka: opts.kafka,
        extra_env: vec![("DEMO_TOPICS".into(), POISON_TOPIC.into())],
        ..Options::default()
    })
    .await?;
    println!(
        "soak: seed={} coordination={coordination} broker={:?} orders={} rate={}/s; stack ready after {:.1}s",
        opts.seed,
        opts.kafka,
        opts.orders,
        opts.rate,
        started.elapsed().as_secs_f64()
    );

    let epochs = FenceWatch::start(stack.pool.clone());
    let load = Load::start(&stack.api, &opts);
    let mut driver = Driver {
        relay_order_violations: 0,
        poison_overtakes: 0,
        faults: BTreeMap::new(),
        absorbed: 0,
        fence_refusals: 0,
        leader_outages: Vec::new(),
        unexpected_exits: BTreeMap::new(),
        crash_orders: 0,
        load_running: true,
    };
    let mut schedule = Schedule::new(opts.seed, opts.bounds);
    let mut injected = 0;
    while !load.done() || injected < opts.min_faults {
        let step = schedule.next().expect("the schedule is endless");
        tokio::time::sleep(step.wait).await;
        driver.restart_unexpected_exits(&mut stack).await?;
        driver.load_running = !load.done();
        driver
            .inject(&mut stack, step.fault, step.pick, step.hold)
            .await
            .with_context(|| format!("fault {} (step {injected})", step.fault))?;
        injected += 1;
        let n: u32 = driver.faults.values().sum();
        println!(
            "soak: {n:>4} faults, {:>6} orders accepted, last {} (hold {:?})",
            load.accepted(),
            step.fault,
            step.hold
        );
    }
    let (retried, acknowledged) = load.finish().await?;
    driver.restart_unexpected_exits(&mut stack).await?;

    let l = drain(&stack.pool, opts.settle_timeout).await?;
    if !l.complete() {
        // Why it did not drain: what each consumer and relay said last, and the consumers' lag.
        for (name, p) in &stack.procs {
            let lag = match stack.metrics(name).await {
                Ok(t) => test_support::metric_value(&t, "outbox_consumer_lag"),
                Err(_) => f64::NAN,
            };
            let logs = p.logs();
            let tail = &logs[logs.len().saturating_sub(15)..];
            println!(
                "soak: not drained; {name} (lag {lag}):\n{}",
                tail.join("\n")
            );
        }
        for (group, table) in [
            ("pharmacy", "demo.pharmacy_orders"),
            ("notification", "demo.notifications"),
        ] {
            let by_partition: Vec<MissingRange> = sqlx::query_as(&format!(
                "SELECT a.kafka_partition, count(*), min(a.kafka_offset), max(a.kafka_offset) \
                       FROM shop.orders o LEFT JOIN outbox.archive a ON a.event_id = o.event_id \
                      WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE e.order_id = o.id) \
                      GROUP BY 1 ORDER BY 1"
            ))
            .fetch_all(&stack.pool)
            .await?;
            println!(
                "soak: {group} effects missing (partition, count, offsets from, to): {by_partition:?}; \
                 committed/high: {:?}",
                committed_and_high(&stack.bootstrap, group)
            );
        }
    }
    for group in ["pharmacy", "notification"] {
        driver.absorbed += stack.metric_sum(group, DUPLICATES_SKIPPED).await as u64;
    }
    driver.relay_order_violations += stack.metric_sum("relay", RELAY_ORDER_VIOLATIONS).await as u64;
    let (regressions, last_epoch) = epochs.stop().await;
    let mut report = Report {
        seed: opts.seed,
        coordination,
        orders: l.orders,
        missing_effects: (l.pharmacy.missing, l.notification.missing),
        duplicate_effects: l.pharmacy.duplicated + l.notification.duplicated,
        epoch_regressions: regressions,
        last_epoch,
        faults: driver.faults.clone(),
        duplicates_absorbed: driver.absorbed,
        fence_refusals: driver.fence_refusals,
        unexpected_exits: driver.unexpected_exits.clone(),
        relay_order_violations: driver.relay_order_violations,
        poison_overtakes: driver.poison_overtakes,
        retried_requests: retried,
        crash_commits: driver.crash_orders,
        ..Report::default()
    };
    let pool = &stack.pool;
    report.unpublished = scalar(
        pool,
        "SELECT count(*) FROM shop.orders o WHERE NOT EXISTS \
         (SELECT 1 FROM outbox.archive a WHERE a.event_id = o.event_id)",
    )
    .await?;
    report.lost = scalar(
        pool,
        "SELECT count(*) FROM shop.orders o WHERE o.event_id NOT IN (SELECT event_id FROM outbox.archive) \
            OR NOT EXISTS (SELECT 1 FROM demo.pharmacy_orders p WHERE p.order_id = o.id) \
            OR NOT EXISTS (SELECT 1 FROM demo.notifications n WHERE n.order_id = o.id)",
    )
    .await?;
    report.order_violations = out_of_order(pool, "demo.pharmacy_orders").await?
        + out_of_order(pool, "demo.notifications").await?;
    let history = crate::ledger::topic_history(pool, &stack.bootstrap).await?;
    println!("soak: orders topic: {}", history.summary());
    report.topic_inversions = history.inversions.len();
    report.topic_lost = history.lost.len();
    report.pending = scalar(pool, "SELECT count(*) FROM outbox.events").await?;
    report.dead = scalar(pool, "SELECT count(*) FROM outbox.dead").await?;
    report.p99_ms = latency_ms(pool, &[0.99]).await?[0];
    for (at, fault) in &driver.leader_outages {
        let gap: Option<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM min(published_at) - to_timestamp($1)) * 1000)::float8 \
               FROM outbox.archive WHERE published_at > to_timestamp($1)",
        )
        .bind(*at)
        .fetch_one(pool)
        .await?;
        if let Some(g) = gap {
            println!(
                "soak: {fault} at +{:.0}s: next publish {g:.0} ms later",
                at - started_unix
            );
            report.max_failover_gap_ms = report.max_failover_gap_ms.max(g);
        }
    }
    // Every order the API acknowledged (201) must be committed.
    report.acknowledged_missing = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[]) AS a(id) \
          WHERE NOT EXISTS (SELECT 1 FROM shop.orders o WHERE o.id = a.id)",
    )
    .bind(&acknowledged)
    .fetch_one(pool)
    .await?;
    report.acknowledged = acknowledged.len() as i64;
    report.lost += report.acknowledged_missing;
    report.elapsed = started.elapsed();
    for (name, status) in stack.stop().await {
        if !status.is_some_and(|s| s.success()) {
            *report
                .unexpected_exits
                .entry(format!("{name}(stop)"))
                .or_default() += 1;
        }
    }
    drop(plane);
    Ok(report)
}

async fn control_plane(
    want: Coordination,
) -> anyhow::Result<(
    Option<test_support::control_plane::ControlPlane>,
    &'static str,
)> {
    if want == Coordination::Single {
        return Ok((None, "single"));
    }
    if let Err(e) = test_support::control_plane::binaries_dir() {
        if want == Coordination::Lease {
            bail!("lease coordination needs the test bed's control plane: {e:#}");
        }
        println!("soak: no Kubernetes control plane here ({e:#}); the relays run in single mode");
        return Ok((None, "single"));
    }
    let plane =
        tokio::task::spawn_blocking(test_support::control_plane::ControlPlane::start).await??;
    Ok((Some(plane), "lease"))
}

async fn scalar(pool: &PgPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Pairs of effects of one customer (key) applied in the other order than their orders were committed:
/// walking a customer's effects in the order the consumer wrote them (identity column), an order created
/// before the previous one's order is a violation.
async fn out_of_order(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    scalar(
        pool,
        &format!(
            "SELECT count(*) FROM ( \
               SELECT o.created_at, lag(o.created_at) OVER (PARTITION BY o.customer ORDER BY e.id) AS prev \
                 FROM {table} e JOIN shop.orders o ON o.id = e.order_id) x \
             WHERE prev > created_at"
        ),
    )
    .await
}

/// Effects missing on one Kafka partition: (partition, count, lowest offset, highest offset).
type MissingRange = (Option<i32>, i64, Option<i64>, Option<i64>);

/// The group's committed offset and the high watermark of each partition of `orders` (diagnostics).
fn committed_and_high(bootstrap: &str, group: &str) -> Vec<(i32, String, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let timeout = Duration::from_secs(5);
    let Ok(c) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create::<BaseConsumer>()
    else {
        return vec![];
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition("orders", p);
    }
    let Ok(committed) = c.committed_offsets(tpl, timeout) else {
        return vec![];
    };
    committed
        .elements()
        .iter()
        .map(|e| {
            let high = c
                .fetch_watermarks("orders", e.partition(), timeout)
                .map_or(-1, |w| w.1);
            (e.partition(), format!("{:?}", e.offset()), high)
        })
        .collect()
}

/// Waits until every order has its effects, or returns the ledger as it is at the timeout.
async fn drain(pool: &PgPool, timeout: Duration) -> anyhow::Result<Ledger> {
    let deadline = Instant::now() + timeout;
    loop {
        let l = ledger(pool).await?;
        let pending = scalar(pool, "SELECT count(*) FROM outbox.events").await?;
        if (l.complete() && pending == 0) || Instant::now() > deadline {
            return Ok(l);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn consumer_names(stack: &Stack) -> Vec<String> {
    stack
        .procs
        .keys()
        .filter(|n| n.starts_with("pharmacy") || n.starts_with("notification"))
        .cloned()
        .collect()
}

const DUPLICATES_SKIPPED: &str = "outbox_consumer_duplicates_skipped_total";
const RELAY_ORDER_VIOLATIONS: &str = "outbox_relay_order_violations_total";
/// The topic of `poison_redrive_discard` (no group reads it).
const POISON_TOPIC: &str = crate::stack::SCRATCH_TOPIC;

/// The fault injector's bookkeeping.
/// How a broker node is taken down.
#[derive(Debug, Clone, Copy)]
enum BrokerFault {
    /// SIGKILL, then a restart on the same data.
    Kill,
    /// SIGSTOP, then SIGCONT: the node's sessions and leases run out while its sockets stay open.
    Pause,
}

/// The node a broker fault hits: every other pick the leader of one of the orders topic's partitions
/// (a leader election under load), else any node (the active controller among them).
fn broker_victim(cluster: &test_support::apache::KafkaCluster, pick: u32) -> anyhow::Result<usize> {
    let nodes = cluster.size();
    if (pick >> 1) & 1 == 0 {
        let partition = ((pick >> 2) % 6) as i32;
        if let Ok(leader) =
            tokio::task::block_in_place(|| cluster.leader(crate::stack::ORDERS_TOPIC, partition))
        {
            return Ok(leader);
        }
    }
    Ok((pick >> 2) as usize % nodes + 1)
}

/// Takes `nodes` down for `hold`, then brings them back.
async fn broker_down(
    cluster: &test_support::apache::KafkaCluster,
    nodes: &[usize],
    how: BrokerFault,
    hold: Duration,
) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| {
        nodes.iter().try_for_each(|&n| match how {
            BrokerFault::Kill => cluster.kill(n),
            BrokerFault::Pause => cluster.pause(n, true),
        })
    })?;
    tokio::time::sleep(hold).await;
    tokio::task::block_in_place(|| {
        nodes.iter().try_for_each(|&n| match how {
            BrokerFault::Kill => cluster.restart(n),
            BrokerFault::Pause => cluster.pause(n, false),
        })
    })
}

struct Driver {
    /// `outbox_relay_order_violations_total` of relays killed so far.
    relay_order_violations: u64,
    /// See [`Report::poison_overtakes`].
    poison_overtakes: u64,
    faults: BTreeMap<Fault, u32>,
    absorbed: u64,
    fence_refusals: u64,
    /// Whether orders are still being posted (a publish gap is measured only then: new events keep coming).
    load_running: bool,
    /// (unix seconds, fault) of leader kills and pauses under load.
    leader_outages: Vec<(f64, Fault)>,
    unexpected_exits: BTreeMap<String, u32>,
    crash_orders: i64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

impl Driver {
    /// Restarts processes that exited on their own (and counts them).
    async fn restart_unexpected_exits(&mut self, stack: &mut Stack) -> anyhow::Result<()> {
        for (name, status) in stack.exited() {
            println!("soak: {name} exited on its own ({status}); restarting it");
            *self.unexpected_exits.entry(name.clone()).or_default() += 1;
            stack.restart(&name).await?;
        }
        Ok(())
    }

    /// The relay that publishes now, and the others. Polls briefly: right after a failover neither may be
    /// active yet.
    async fn relays(&self, stack: &Stack) -> (Option<String>, Vec<String>) {
        let names = stack.relay_names();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for n in &names {
                if let Ok(text) = stack.metrics(n).await {
                    if test_support::metric_value(&text, "outbox_relay_active") == 1.0 {
                        let others = names.iter().filter(|o| *o != n).cloned().collect();
                        return (Some(n.clone()), others);
                    }
                }
            }
            if Instant::now() > deadline {
                return (None, names);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn inject(
        &mut self,
        stack: &mut Stack,
        fault: Fault,
        pick: u32,
        hold: Duration,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::KillRelayLeader | Fault::KillRelayStandby => {
                let (leader, standbys) = self.relays(stack).await;
                let victim = match (fault, leader) {
                    (Fault::KillRelayLeader, Some(l)) => l,
                    _ => standbys[pick as usize % standbys.len()].clone(),
                };
                if fault == Fault::KillRelayLeader && self.load_running {
                    self.leader_outages.push((unix_now(), fault));
                }
                // Its counter dies with it.
                self.relay_order_violations +=
                    stack.metric_sum(&victim, RELAY_ORDER_VIOLATIONS).await as u64;
                stack.kill(&victim).await?;
                tokio::time::sleep(hold).await;
                stack.restart(&victim).await?;
            }
            Fault::KillConsumer => {
                let names = consumer_names(stack);
                let victim = names[pick as usize % names.len()].clone();
                // Its counter dies with it: add what it absorbed so far.
                self.absorbed += stack.metric_sum(&victim, DUPLICATES_SKIPPED).await as u64;
                stack.kill(&victim).await?;
                tokio::time::sleep(hold).await;
                stack.restart(&victim).await?;
            }
            Fault::PauseRelayLeader => {
                let (leader, standbys) = self.relays(stack).await;
                let victim = leader.unwrap_or_else(|| standbys[0].clone());
                if self.load_running {
                    self.leader_outages.push((unix_now(), fault));
                }
                let before = fenced(stack, &victim).await;
                stack.signal(&victim, Signal::SIGSTOP)?;
                tokio::time::sleep(Schedule::pause(LEASE_DURATION)).await;
                stack.signal(&victim, Signal::SIGCONT)?;
                // Give the resumed relay its moment: a batch in flight reaches its commit, meets the new
                // epoch in the fence and is rolled back.
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.fence_refusals += fenced(stack, &victim).await.saturating_sub(before);
            }
            Fault::RestartPostgres => {
                let pg = stack
                    .postgres()
                    .context("the soak restarts its own PostgreSQL")?;
                tokio::task::block_in_place(|| pg.restart_immediate())?;
            }
            Fault::BrokerOutage => {
                if let Some(cluster) = stack.apache() {
                    let node = broker_victim(cluster, pick)?;
                    let how = if pick & 1 == 0 {
                        BrokerFault::Kill
                    } else {
                        BrokerFault::Pause
                    };
                    println!("soak: broker node {node} {how:?} for {hold:?}");
                    broker_down(cluster, &[node], how, hold).await?;
                } else {
                    let broker = stack
                        .broker_outage()
                        .context("the soak takes its own broker down")?;
                    broker.cut();
                    tokio::time::sleep(hold).await;
                    broker.restore();
                }
            }
            Fault::LateCommit => {
                let api = stack.api.clone();
                self.late_commit(&api, pick, hold).await?;
            }
            Fault::LongBrokerOutage => {
                if let Some(cluster) = stack.apache() {
                    // Two of three down: too few in-sync replicas (and no controller quorum), so no
                    // write is acknowledged until they return.
                    let first = broker_victim(cluster, pick)?;
                    let nodes = cluster.size();
                    let down: Vec<usize> = (0..nodes.min(2))
                        .map(|i| (first - 1 + i) % nodes + 1)
                        .collect();
                    println!(
                        "soak: broker nodes {down:?} killed for {:?}",
                        crate::chaos::LONG_OUTAGE
                    );
                    broker_down(cluster, &down, BrokerFault::Kill, crate::chaos::LONG_OUTAGE)
                        .await?;
                } else {
                    let broker = stack
                        .broker_outage()
                        .context("the soak takes its own broker down")?;
                    broker.cut();
                    tokio::time::sleep(crate::chaos::LONG_OUTAGE).await;
                    broker.restore();
                }
            }
            Fault::PoisonRedriveDiscard => self.poison(stack, pick).await?,
            Fault::ApiCrashAfterCommit => {
                let r = reqwest::Client::new()
                    .post(format!("{}/orders?crash=after-commit", stack.api))
                    .json(&json!({"customer": format!("crash-{pick}"), "items": [{"sku": "chaos", "quantity": 1}]}))
                    .send()
                    .await;
                if let Ok(r) = r {
                    // The database may have refused the order (e.g. restarting): no commit, no crash.
                    println!("soak: crash=after-commit answered {}", r.status());
                } else {
                    let api = stack.procs.get_mut("api").context("no api")?;
                    let status = api.wait().await;
                    if status.and_then(|s| s.code()) != Some(3) {
                        bail!("the API did not exit with 3 right after the commit: {status:?}");
                    }
                    self.crash_orders += 1;
                }
                tokio::time::sleep(hold).await;
                stack.restart("api").await?;
            }
        }
        *self.faults.entry(fault).or_default() += 1;
        Ok(())
    }

    /// `poison_redrive_discard` (see [`Fault::PoisonRedriveDiscard`]). Steps the database refuses (it may
    /// be restarting) end the step early; the drain's `dead`/`pending` counts still judge what is left.
    async fn poison(&mut self, stack: &Stack, pick: u32) -> anyhow::Result<()> {
        let key = format!("poison-{pick}");
        let http = reqwest::Client::new();
        let post = |payload: serde_json::Value| {
            http.post(format!("{}/messages", stack.api))
                .json(&json!({"topic": POISON_TOPIC, "key": key, "payload": payload}))
                .send()
        };
        let big = "x".repeat(300_000);
        let accepted =
            |r: reqwest::Result<reqwest::Response>| r.is_ok_and(|r| r.status().is_success());
        if !accepted(post(json!({"poison": big})).await) {
            println!("soak: poison not accepted (database restarting?); step skipped");
            return Ok(());
        }
        if !accepted(post(json!({"after": "poison"})).await) {
            // The head alone still parks nothing behind it; discard it once dead.
            println!("soak: the poison's follower not accepted");
        }
        if !wait_dead(&stack.pool, &key).await {
            bail!("the poison event of {key} was not dead-lettered within 60 s");
        }
        // Redriven, it is dead again (still too large); its follower must not overtake it meanwhile.
        relay_dead(&stack.database_url, "redrive", &key).await?;
        if !wait_dead(&stack.pool, &key).await {
            bail!("the redriven poison event of {key} was not dead-lettered again within 60 s");
        }
        let delivered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox.archive WHERE key = $1 AND topic = $2")
                .bind(&key)
                .bind(POISON_TOPIC)
                .fetch_one(&stack.pool)
                .await
                .unwrap_or(0);
        if delivered > 0 {
            self.poison_overtakes += 1;
        }
        relay_dead(&stack.database_url, "discard", &key).await?;
        Ok(())
    }

    /// A hot key (`late-0` … `late-3`) whose order commits `hold` late, then two more orders of the key
    /// at once: the late row lands below the batches in flight, and its key's next events must wait for
    /// it. Each step waits for the key's previous order, so the key's writers stay serialised.
    async fn late_commit(&mut self, api: &str, pick: u32, hold: Duration) -> anyhow::Result<()> {
        let customer = format!("late-{}", pick % 4);
        let http = reqwest::Client::new();
        for delay in [hold, Duration::ZERO, Duration::ZERO] {
            let r = http
                .post(format!(
                    "{api}/orders?commit_delay_ms={}",
                    delay.as_millis()
                ))
                .json(&json!({"customer": customer, "items": [{"sku": "late", "quantity": 1}]}))
                .send()
                .await;
            // The database may be restarting: the order is then not committed, which the ledger allows.
            match r {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => println!("soak: late commit answered {}", r.status()),
                Err(e) => println!("soak: late commit failed: {e}"),
            }
        }
        Ok(())
    }
}

/// Waits up to a minute for a dead row of `key` (the database may be restarting meanwhile).
async fn wait_dead(pool: &PgPool, key: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead WHERE key = $1")
            .bind(key)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// `outbox-relay dead <verb> --key <key>`, as an operator runs it; retried while the database restarts.
async fn relay_dead(database_url: &str, verb: &str, key: &str) -> anyhow::Result<()> {
    for _ in 0..20 {
        let out = tokio::process::Command::new(crate::bins::bin("outbox-relay")?)
            .args(["dead", verb, "--key", key])
            .env("DATABASE_URL", database_url)
            .output()
            .await?;
        if out.status.success() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("outbox-relay dead {verb} --key {key} kept failing")
}

/// `outbox_relay_batch_errors_total{reason="fenced"|"lost"}` of a relay.
async fn fenced(stack: &Stack, relay: &str) -> u64 {
    let Ok(text) = stack.metrics(relay).await else {
        return 0;
    };
    text.lines()
        .filter(|l| l.starts_with("outbox_relay_batch_errors_total{"))
        .filter(|l| l.contains("\"fenced\"") || l.contains("\"lost\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Samples the fence epoch every 100 ms; counts every time it is lower than the last value seen.
struct FenceWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(i64, i64)>,
}

impl FenceWatch {
    fn start(pool: PgPool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut last, mut regressions) = (i64::MIN, 0);
            while !flag.load(Ordering::Relaxed) {
                // Errors while PostgreSQL restarts are expected; the next sample reads again.
                if let Ok(Some(epoch)) = sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT max(epoch) FROM outbox.fence WHERE scope = 'default'",
                )
                .fetch_one(&pool)
                .await
                {
                    if epoch < last {
                        regressions += 1;
                    }
                    last = last.max(epoch);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (regressions, last)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (i64, i64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((0, 0))
    }
}

/// The order load: workers posting their customers' orders one at a time at a steady overall rate,
/// retrying an order until the API accepts it (the API may be down or its database restarting).
struct Load {
    accepted: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<uuid::Uuid>>>>,
}

impl Load {
    fn start(api: &str, opts: &SoakOptions) -> Self {
        let accepted = Arc::new(AtomicU64::new(0));
        let retried = Arc::new(AtomicU64::new(0));
        let per_worker_interval = Duration::from_secs_f64(opts.workers as f64 / opts.rate);
        let http = reqwest::Client::new();
        let workers = (0..opts.workers)
            .map(|w| {
                let n = opts.orders / opts.workers + usize::from(w < opts.orders % opts.workers);
                let (http, api) = (http.clone(), api.to_owned());
                let (accepted, retried) = (accepted.clone(), retried.clone());
                let keys = opts.keys_per_worker;
                tokio::spawn(async move {
                    let mut ids = Vec::with_capacity(n);
                    let mut tick = tokio::time::interval(per_worker_interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for i in 0..n {
                        tick.tick().await;
                        let body = json!({
                            "customer": format!("c{w}-{}", i % keys),
                            "items": [{"sku": format!("sku-{}", i % 13), "quantity": 1 + (i % 3)}],
                        });
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            match http.post(format!("{api}/orders")).json(&body).send().await {
                                Ok(r) if r.status().as_u16() == 201 => {
                                    let v: serde_json::Value = r.json().await?;
                                    let id = v["order"]["id"].as_str().context("order id")?;
                                    ids.push(uuid::Uuid::parse_str(id)?);
                                    break;
                                }
                                Ok(r) if r.status().is_client_error() => {
                                    bail!("the API refused a valid order: {}", r.status())
                                }
                                // Connection refused or cut (API down) or 5xx (database restarting).
                                // A cut connection may have followed a commit: that order then exists
                                // twice, as when a user retries; both are in the ledger.
                                _ => {
                                    retried.fetch_add(1, Ordering::Relaxed);
                                    if tries > 600 {
                                        bail!("an order was not accepted after {tries} tries");
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ids)
                })
            })
            .collect();
        Self {
            accepted,
            retried,
            workers,
        }
    }

    fn done(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits for every worker; returns the retried requests and the acknowledged order ids.
    async fn finish(self) -> anyhow::Result<(u64, Vec<uuid::Uuid>)> {
        let mut ids = Vec::new();
        for w in self.workers {
            ids.extend(w.await??);
        }
        Ok((self.retried.load(Ordering::Relaxed), ids))
    }
}
