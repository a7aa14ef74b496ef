//! The consume loop: inbox rows + handler effects in one transaction, then the offset.
//!
//! Records are drained from librdkafka in batches and grouped into runs per partition. A run is handled
//! in one transaction (one inbox statement for the whole run, then the handler for each new event), runs
//! of different partitions concurrently. Any handler failure rolls the run back and replays it one event
//! per transaction, so retries, the DLQ and the stored offset are decided for each event on its own.
//!
//! This module holds the configuration and the loop; `kafka` the client, its callbacks, membership checks
//! and pause-and-rewind; `transaction` the database side (runs, replays, decisions); `dlq` the dead letters.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use outbox::SchemaName;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::decide::{self, HandlerError, Next, RetryPolicy};
use crate::health::Health;
use crate::inbox::Inbox;
use crate::membership::{GroupState, MembershipWatch, PartitionProgress};
use crate::message::{decode, Message};
use crate::metrics::{Metrics, TopicPartition};

/// Application logic run for each new event, inside the transaction that also records the inbox row.
/// Write effects through `tx`; return `Err` to roll them back. Several events of one partition may share
/// a transaction; a failure of any of them replays each in its own.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    fn handle(
        &self,
        msg: &Message,
        tx: &mut Transaction<'static, Postgres>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Settings of one consumer process.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Kafka consumer group (also the inbox's group column).
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Bootstrap servers.
    pub brokers: String,
    /// Extra librdkafka properties.
    pub kafka_extra: Vec<(String, String)>,
    /// Schema holding the inbox table.
    pub inbox_schema: SchemaName,
    /// Handler retries.
    pub retry: RetryPolicy,
    /// Group session timeout: how soon a dead member's partitions move.
    pub session_timeout: Duration,
    /// Name of this instance in logs.
    pub instance_id: String,
    /// Most events handled in one transaction (1 = one transaction per event).
    pub batch_size: usize,
    /// Partitions handled at the same time (each needs a database connection).
    pub concurrency: usize,
    /// Inbox rows older than this are deleted in bounded batches; `None` keeps them.
    pub inbox_retention: Option<Duration>,
    /// A group membership unsettled this long while a broker answers gets a new Kafka client (see
    /// [`crate::membership`]).
    pub rejoin_timeout: Duration,
    /// Process past an offset gap seen twice (compacted or transactional topics) instead of stopping the
    /// partition there (see [`crate::continuity`]).
    pub accept_offset_gaps: bool,
}

impl RuntimeConfig {
    /// Defaults for everything but the group, topics and brokers.
    pub fn new(
        group_id: impl Into<String>,
        topics: Vec<String>,
        brokers: impl Into<String>,
    ) -> Self {
        let group_id = group_id.into();
        Self {
            instance_id: format!("{group_id}-{}", std::process::id()),
            group_id,
            topics,
            brokers: brokers.into(),
            kafka_extra: vec![],
            inbox_schema: SchemaName::new(crate::inbox::DEFAULT_SCHEMA).expect("valid default"),
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(30),
            },
            session_timeout: Duration::from_secs(10),
            batch_size: 500,
            concurrency: 4,
            inbox_retention: None,
            rejoin_timeout: Duration::from_secs(60),
            accept_offset_gaps: false,
        }
    }
}

/// How long a partition stopped at an offset gap waits before it fetches the missing offsets once more.
const GAP_REFETCH: Duration = Duration::from_secs(30);

type KafkaConsumer = StreamConsumer<Callbacks>;

/// A (topic, partition).
type Slot = (String, i32);

/// The group's progress on every partition of its topics (see [`crate::membership::group_stuck`]).
type Progress = std::collections::BTreeMap<Slot, PartitionProgress>;

/// Called with the time from an event's handler start to its commit (benchmarks).
pub type CommitObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// Why a Kafka client's consume loop ended.
enum Ended {
    Shutdown,
    /// The group membership stalled: replace the client.
    Stalled,
}

/// A partition paused and rewound: the event at `offset` comes back after `delay`.
struct Rewind {
    offset: i64,
    delay: Duration,
    /// Handler attempts made at `offset`, when this rewind follows a handler failure.
    attempts: Option<u32>,
}

/// A gap's refetch: from which offset, after what delay, and the offset still expected.
type Refetch = (i64, Duration, i64);

/// Per-partition retry state: the offset being retried and the attempts made.
type RetryState = HashMap<Slot, (i64, u32)>;

/// Per-partition continuity (see [`crate::continuity`]): the offset after the last one processed, and the
/// expected offset a gap was last fetched again for.
#[derive(Default)]
struct Positions {
    expected: HashMap<Slot, i64>,
    /// The expected offset a gap was last seen at, and how many times in a row.
    refetched: HashMap<Slot, (i64, u32)>,
    /// Partitions stopped at a gap seen twice.
    stalled: HashSet<Slot>,
    rebalances: u64,
}

/// A consumer group member: one Kafka consumer, one database pool, one handler.
pub struct Runtime<H: Handler> {
    cfg: RuntimeConfig,
    pool: PgPool,
    inbox: Inbox,
    handler: H,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    dlq: FutureProducer,
    observer: Option<CommitObserver>,
    /// The group's progress when this member last sampled it without partitions.
    last_progress: Mutex<Option<Progress>>,
}

mod dlq;
mod kafka;
mod transaction;

use kafka::{commit_stored, Callbacks};

impl<H: Handler> Runtime<H> {
    /// Builds the runtime (no IO until [`Runtime::run`]).
    pub fn new(
        cfg: RuntimeConfig,
        pool: PgPool,
        handler: H,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let mut p = ClientConfig::new();
        p.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all");
        for (k, v) in &cfg.kafka_extra {
            p.set(k, v);
        }
        let dlq = p.create()?;
        let inbox = Inbox::new(cfg.inbox_schema.clone());
        Ok(Self {
            cfg,
            pool,
            inbox,
            handler,
            metrics,
            health: Arc::default(),
            dlq,
            observer: None,
            last_progress: Mutex::new(None),
        })
    }

    /// Readiness flags this runtime keeps up to date (serve them with [`crate::health::Surfaces`]).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Calls `f` with each event's handler-start-to-commit time.
    pub fn with_commit_observer(mut self, f: CommitObserver) -> Self {
        self.observer = Some(f);
        self
    }

    /// Consumes until `shutdown`, then commits what is done and leaves the group. A client whose group
    /// membership stalls is replaced by a new one (see [`crate::membership`]).
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let monitors = shutdown.child_token();
        let health = self.health.clone();
        tokio::spawn(process_kit::service::watch_database(
            self.pool.clone(),
            Duration::from_secs(2),
            monitors.clone(),
            move |up| health.set_database(up),
        ));
        if let Some(window) = self.cfg.inbox_retention {
            tokio::spawn(expire_inbox(
                self.inbox.clone(),
                self.pool.clone(),
                window,
                monitors.clone(),
            ));
        }
        let result = async {
            loop {
                let consumer = self.consumer()?;
                let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
                consumer.subscribe(&topics)?;
                tracing::info!(group = %self.cfg.group_id, instance = %self.cfg.instance_id, ?topics, "consuming");
                let ended = self.consume(&consumer, &shutdown).await;
                match ended {
                    Ended::Shutdown => {
                        commit_stored(&consumer);
                        return Ok(());
                    }
                    Ended::Stalled => {
                        self.metrics.client_restarts.inc();
                        self.metrics.assigned_partitions.set(0);
                        // Closing a client stuck in a group can block on its coordinator: not on the
                        // runtime's threads.
                        let closing = tokio::task::spawn_blocking(move || drop(consumer));
                        let _ = closing.await;
                    }
                }
            }
        }
        .await;
        monitors.cancel();
        result
    }

    /// The consume loop of one Kafka client, until shutdown or a stalled membership.
    async fn consume(&self, consumer: &KafkaConsumer, shutdown: &CancellationToken) -> Ended {
        let mut retry: RetryState = HashMap::new();
        let mut positions = Positions::default();
        let mut resumes: Vec<(Instant, Slot)> = Vec::new();
        let max_batch = self.cfg.batch_size.max(1);
        let mut membership_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_resume = resumes.iter().map(|r| r.0).min();
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                _ = membership_check.tick() => {
                    if self.membership_stalled(consumer) {
                        return Ended::Stalled;
                    }
                }
                _ = sleep_until(next_resume) => {
                    let now = Instant::now();
                    for (_, (topic, partition)) in resumes.iter().filter(|r| r.0 <= now) {
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(topic, *partition);
                        // Fails harmlessly when the partition was revoked meanwhile.
                        let _ = consumer.resume(&tpl);
                    }
                    resumes.retain(|r| r.0 > now);
                }
                m = consumer.recv() => {
                    let mut batch = match m {
                        Ok(m) => vec![m],
                        Err(e) => {
                            tracing::warn!("consume error: {e}");
                            continue;
                        }
                    };
                    // Take what librdkafka already fetched, without waiting for more.
                    while batch.len() < max_batch {
                        match consumer.recv().now_or_never() {
                            Some(Ok(m)) => batch.push(m),
                            Some(Err(e)) => {
                                tracing::warn!("consume error: {e}");
                                break;
                            }
                            None => break,
                        }
                    }
                    let rebalances = consumer
                        .context()
                        .rebalances
                        .load(std::sync::atomic::Ordering::SeqCst);
                    if rebalances != positions.rebalances {
                        positions = self.positions_after_rebalance(consumer, positions, rebalances);
                    }
                    let now = Instant::now();
                    for (slot, r) in self.process_batch(consumer, batch, &mut retry, &mut positions).await {
                        resumes.push((now + r.delay, slot));
                    }
                }
            }
        }
    }
}

impl<H: Handler> Runtime<H> {
    /// Positions after partitions moved. A partition this member kept goes on from where it was; one it
    /// was given is expected at the group's committed offset, so a first fetch that starts past it is a
    /// gap like any other (before, the check was blind until the first run after an assignment).
    /// Gap bookkeeping starts over: another member may have processed in between.
    fn positions_after_rebalance(
        &self,
        consumer: &KafkaConsumer,
        before: Positions,
        rebalances: u64,
    ) -> Positions {
        let mut expected = HashMap::new();
        if let Ok(assigned) = consumer.assignment() {
            let committed = consumer
                .committed_offsets(assigned.clone(), Duration::from_secs(2))
                .ok();
            for e in assigned.elements() {
                let slot = (e.topic().to_owned(), e.partition());
                let at = before.expected.get(&slot).copied().or_else(|| {
                    committed
                        .as_ref()?
                        .find_partition(e.topic(), e.partition())?
                        .offset()
                        .to_raw()
                        .filter(|o| *o >= 0)
                });
                if let Some(at) = at {
                    expected.insert(slot, at);
                }
            }
        }
        Positions {
            expected,
            rebalances,
            ..Positions::default()
        }
    }
}

/// Deletes expired inbox rows every tenth of the window (at most once a minute).
async fn expire_inbox(inbox: Inbox, pool: PgPool, window: Duration, stop: CancellationToken) {
    let every = (window / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        match inbox.expire(&pool, window, 10_000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("inbox: removed {n} rows older than {window:?}"),
            Err(e) => tracing::warn!("inbox expiry failed: {e}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
