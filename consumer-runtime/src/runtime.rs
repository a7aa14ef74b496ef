//! The consume loop: inbox rows + handler effects in one transaction, then the offset.
//!
//! Records are drained from librdkafka in batches and grouped into runs per partition. A run is handled
//! in one transaction (one inbox statement for the whole run, then the handler for each new event), runs
//! of different partitions concurrently. Any handler failure rolls the run back and replays it one event
//! per transaction, so retries, the DLQ and the stored offset are decided for each event on its own.

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
        }
    }
}

/// librdkafka callbacks: commit before partitions move; readiness, lag and the group membership's
/// progress from statistics.
struct Callbacks {
    group: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    membership: Mutex<MembershipWatch>,
    /// Rebalances seen (the loop forgets its expected offsets when this moves).
    rebalances: std::sync::atomic::AtomicU64,
}

impl ClientContext for Callbacks {
    fn stats(&self, s: Statistics) {
        let up = s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.health.set_broker(up);
        if let Some(g) = &s.cgrp {
            let state = GroupState {
                state: g.state.clone(),
                join_state: g.join_state.clone(),
                assignment_size: g.assignment_size,
            };
            self.membership
                .lock()
                .expect("membership watch")
                .observe(Instant::now(), state, up);
        }
        let lag = s.topics.iter().flat_map(|(topic, t)| {
            t.partitions
                .iter()
                .filter(|(p, part)| {
                    **p >= 0 && part.consumer_lag >= 0 && part.fetch_state != "none"
                })
                .map(|(p, part)| {
                    let tp = TopicPartition {
                        topic: topic.clone(),
                        partition: *p,
                    };
                    (tp, part.consumer_lag)
                })
        });
        self.metrics.set_lag(lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_broker(false);
        }
        tracing::warn!(group = %self.group, "kafka: {error}: {reason}");
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions revoked; committing processed offsets");
                commit_stored(consumer);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(group = %self.group, "rebalance error: {e}"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        // With the cooperative protocol a rebalance assigns or revokes only the partitions that move.
        let owned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(owned as i64);
    }
}

fn commit_stored<C: ConsumerContext, T: Consumer<C>>(consumer: &T) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!("offset commit failed: {e}"),
    }
}

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

/// How one attempt at a single event ended.
enum Attempt {
    /// The inbox already had it: skipped.
    Duplicate,
    /// The handler ran; effects committed on `Ok`, rolled back on `Err`.
    Handled(Result<(), HandlerError>),
}

/// A partition paused and rewound: the event at `offset` comes back after `delay`.
struct Rewind {
    offset: i64,
    delay: Duration,
    /// Handler attempts made at `offset`, when this rewind follows a handler failure.
    attempts: Option<u32>,
}

/// Per-partition retry state: the offset being retried and the attempts made.
type RetryState = HashMap<Slot, (i64, u32)>;

/// Per-partition continuity (see [`crate::continuity`]): the offset after the last one processed, and the
/// expected offset a gap was last fetched again for.
#[derive(Default)]
struct Positions {
    expected: HashMap<Slot, i64>,
    refetched: HashMap<Slot, i64>,
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

impl<H: Handler> Runtime<H> {
    /// Runs the handler in a span that continues the event's trace (its `traceparent` header, written by
    /// the producing transaction and forwarded by the relay), so one trace runs request → commit → publish
    /// → handler when traces are exported.
    async fn handle_in_span(
        &self,
        msg: &Message,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        use opentelemetry::trace::TraceContextExt;
        let span = tracing::info_span!(
            "consumer.handle",
            group = %self.cfg.group_id,
            topic = %msg.topic,
            partition = msg.partition,
            event_id = %msg.event_id,
            trace_id = tracing::field::Empty,
        );
        if let Some(sc) = msg
            .headers
            .get("traceparent")
            .and_then(|h| outbox::parse_traceparent(h))
        {
            // The event's trace, in every log line of its handling (also when traces are not exported).
            span.record("trace_id", sc.trace_id().to_string());
            let parent = opentelemetry::Context::new().with_remote_span_context(sc);
            // Fails only when no OpenTelemetry layer is installed (traces off): nothing to continue then.
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
        }
        tracing::Instrument::instrument(self.handler.handle(msg, tx), span).await
    }

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

    fn consumer(&self) -> Result<KafkaConsumer, KafkaError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers)
            .set("group.id", &self.cfg.group_id)
            .set("client.id", &self.cfg.instance_id)
            // Offsets are stored by us only after the effect (or the DLQ write) is durable; librdkafka
            // commits what is stored every second and on revoke.
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Incremental rebalancing: partitions that stay with a member keep flowing while others
            // move (scaling a group, a member restarting). Every member of a group must use the same.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Statistics feed broker readiness and the per-partition lag gauges.
            .set("statistics.interval.ms", "2000")
            .set(
                "session.timeout.ms",
                self.cfg.session_timeout.as_millis().to_string(),
            );
        for (k, v) in &self.cfg.kafka_extra {
            c.set(k, v);
        }
        c.create_with_context(Callbacks {
            group: self.cfg.group_id.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            membership: Mutex::new(MembershipWatch::new(self.cfg.rejoin_timeout)),
            rebalances: Default::default(),
        })
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
                        // Partitions moved: another member may have processed in between.
                        positions = Positions {
                            rebalances,
                            ..Positions::default()
                        };
                    }
                    let now = Instant::now();
                    for (slot, r) in self.process_batch(consumer, batch, &mut retry, &mut positions).await {
                        resumes.push((now + r.delay, slot));
                    }
                }
            }
        }
    }

    /// Whether the client's group membership is stuck: unsettled past the rejoin timeout, or settled
    /// without partitions past it although the group's size says this member should own some.
    fn membership_stalled(&self, consumer: &KafkaConsumer) -> bool {
        let now = Instant::now();
        let (stalled, empty) = {
            let watch = consumer
                .context()
                .membership
                .lock()
                .expect("membership watch");
            (watch.stalled(now), watch.empty_too_long(now))
        };
        if let Some((unsettled, last)) = stalled {
            tracing::warn!(
                group = %self.cfg.group_id,
                state = %last.state,
                join_state = %last.join_state,
                "group membership unsettled for {unsettled:?} while the broker answers; recreating the Kafka client"
            );
            return true;
        }
        let Some(empty) = empty else { return false };
        // Blocking broker calls on the loop: only reached once per rejoin timeout without partitions,
        // when this member has nothing to process anyway.
        let sample = self.group_progress(consumer);
        consumer
            .context()
            .membership
            .lock()
            .expect("membership watch")
            .empty_is_legitimate(now);
        let before = std::mem::replace(
            &mut *self.last_progress.lock().expect("progress"),
            sample.clone(),
        );
        match (before, sample) {
            (Some(before), Some(after)) if crate::membership::group_stuck(&before, &after) => {
                tracing::warn!(
                    group = %self.cfg.group_id,
                    "no partitions for {empty:?} and no offset of the group committed while records wait; recreating the Kafka client"
                );
                *self.last_progress.lock().expect("progress") = None;
                true
            }
            _ => false,
        }
    }

    /// The group's committed offset and the watermarks of every partition of the subscribed topics;
    /// `None` when the broker does not answer in time.
    fn group_progress(&self, consumer: &KafkaConsumer) -> Option<Progress> {
        let timeout = Duration::from_secs(2);
        let mut tpl = TopicPartitionList::new();
        for topic in &self.cfg.topics {
            let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
            for p in md.topics().first()?.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(tpl, timeout).ok()?;
        committed
            .elements()
            .iter()
            .map(|e| {
                let (low, high) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .ok()?;
                let at = PartitionProgress {
                    committed: e.offset().to_raw().filter(|o| *o >= 0),
                    low,
                    high,
                };
                Some(((e.topic().to_owned(), e.partition()), at))
            })
            .collect()
    }

    /// Splits a batch into runs per partition and processes the runs concurrently. Returns the
    /// partitions that were paused and rewound.
    async fn process_batch(
        &self,
        consumer: &KafkaConsumer,
        batch: Vec<BorrowedMessage<'_>>,
        retry: &mut RetryState,
        positions: &mut Positions,
    ) -> Vec<(Slot, Rewind)> {
        let mut runs: Vec<(Slot, Vec<BorrowedMessage<'_>>)> = Vec::new();
        for m in batch {
            let slot = (m.topic().to_owned(), m.partition());
            match runs.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, run)) => run.push(m),
                None => runs.push((slot, vec![m])),
            }
        }
        // A run cut short at a gap ends with fetching again from the expected offset.
        let mut refetch: HashMap<Slot, i64> = HashMap::new();
        for (slot, run) in runs.iter_mut() {
            let offsets: Vec<i64> = run.iter().map(|m| m.offset()).collect();
            let continuity =
                crate::continuity::check(positions.expected.get(slot).copied(), &offsets);
            if let crate::continuity::Continuity::GapAt {
                index,
                expected,
                found,
            } = continuity
            {
                self.metrics.offset_gaps.inc();
                let (topic, partition) = (&slot.0, slot.1);
                if positions.refetched.get(slot) == Some(&expected) {
                    tracing::warn!(
                        topic,
                        partition,
                        expected,
                        found,
                        "offsets missing again after fetching them once more; accepting the gap"
                    );
                } else {
                    tracing::warn!(
                        topic,
                        partition,
                        expected,
                        found,
                        "the broker skipped offsets; fetching again from the expected one"
                    );
                    positions.refetched.insert(slot.clone(), expected);
                    run.truncate(index);
                    refetch.insert(slot.clone(), expected);
                }
            }
        }
        let jobs: Vec<_> = runs
            .into_iter()
            .map(|(slot, run)| {
                let prior = retry.get(&slot).copied();
                let refetch_from = refetch.get(&slot).copied();
                async move {
                    let mut rewind = self.process_run(consumer, &slot, &run, prior).await;
                    if let (None, Some(from)) = (&rewind, refetch_from) {
                        rewind = Some(self.rewind(consumer, &slot, from, Duration::ZERO, None));
                    }
                    let next = match &rewind {
                        Some(r) => Some(r.offset),
                        None => run.last().map(|m| m.offset() + 1),
                    };
                    (slot, rewind, next)
                }
            })
            .collect();
        let outcomes: Vec<(Slot, Option<Rewind>, Option<i64>)> = futures::stream::iter(jobs)
            .buffer_unordered(self.cfg.concurrency.max(1))
            .collect()
            .await;
        let mut rewound = Vec::new();
        for (slot, rewind, next) in outcomes {
            if let Some(next) = next {
                positions.expected.insert(slot.clone(), next);
            }
            match rewind {
                None => {
                    retry.remove(&slot);
                }
                Some(r) => {
                    if let Some(a) = r.attempts {
                        retry.insert(slot.clone(), (r.offset, a));
                    }
                    rewound.push((slot, r));
                }
            }
        }
        rewound
    }

    /// Processes consecutive records of one partition: the rest of the run in one transaction when
    /// possible; around a failed handler, one by one. Stops at the first record that has to wait.
    async fn process_run(
        &self,
        consumer: &KafkaConsumer,
        slot: &Slot,
        run: &[BorrowedMessage<'_>],
        prior: Option<(i64, u32)>,
    ) -> Option<Rewind> {
        let mut i = 0;
        while i < run.len() {
            let attempt = match prior {
                Some((o, a)) if o == run[i].offset() => a + 1,
                _ => 1,
            };
            let decoded: Option<Vec<Message>> = if attempt == 1 && run.len() - i > 1 {
                run[i..].iter().map(|m| decode(m).ok()).collect()
            } else {
                None
            };
            if let Some(msgs) = decoded {
                match self.attempt_run(slot, &msgs).await {
                    Ok(None) => {
                        self.store_offset(consumer, slot, run[run.len() - 1].offset());
                        return None;
                    }
                    // Everything rolled back. Those before the failed event commit one by one; the
                    // failed one counts its first attempt without running again.
                    Ok(Some((failed, error))) => {
                        for m in &run[i..i + failed] {
                            if let Some(r) = self.process_one(consumer, m, 1).await {
                                return Some(r);
                            }
                        }
                        let next = self.decide(&msgs[failed], Err(error), 1);
                        if let Some(r) = self.conclude(consumer, &run[i + failed], next, 1).await {
                            return Some(r);
                        }
                        i += failed + 1;
                        continue;
                    }
                    Err(e) => {
                        return Some(self.database_error(consumer, slot, run[i].offset(), &e))
                    }
                }
            }
            if let Some(r) = self.process_one(consumer, &run[i], attempt).await {
                return Some(r);
            }
            i += 1;
        }
        None
    }

    /// Database trouble is never the message's fault: rewind without counting an attempt.
    fn database_error(
        &self,
        consumer: &KafkaConsumer,
        slot: &Slot,
        offset: i64,
        e: &sqlx::Error,
    ) -> Rewind {
        self.metrics.database_errors.inc();
        self.health.set_database(false);
        let d = decide::backoff(1, &self.cfg.retry, rand::random::<f64>());
        tracing::warn!(
            topic = slot.0,
            partition = slot.1,
            offset,
            "database error ({e}); retrying in {d:?}"
        );
        self.rewind(consumer, slot, offset, d, None)
    }

    /// One transaction for a run: one inbox statement, then the handler for each new event. On a
    /// handler failure everything is rolled back and the failed event's index and error returned.
    async fn attempt_run(
        &self,
        slot: &Slot,
        msgs: &[Message],
    ) -> Result<Option<(usize, HandlerError)>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let new = self
            .inbox
            .record_all(&mut tx, &self.cfg.group_id, &slot.0, slot.1, msgs)
            .await?;
        let mut seen = HashSet::new();
        let mut starts = Vec::with_capacity(new.len());
        for (index, msg) in msgs.iter().enumerate() {
            if !new.contains(&msg.event_id) || !seen.insert(msg.event_id) {
                continue;
            }
            let started = Instant::now();
            let result = self.handle_in_span(msg, &mut tx).await;
            self.metrics
                .handler_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(error) = result {
                tx.rollback().await?;
                return Ok(Some((index, error)));
            }
            starts.push(started);
        }
        tx.commit().await?;
        self.committed(&starts, msgs.len());
        Ok(None)
    }

    /// Bookkeeping after a commit of `total` records of which `starts.len()` ran the handler.
    fn committed(&self, starts: &[Instant], total: usize) {
        let now = Instant::now();
        for s in starts {
            let d = now - *s;
            self.metrics
                .handler_to_commit_seconds
                .observe(d.as_secs_f64());
            if let Some(f) = &self.observer {
                f(d);
            }
        }
        self.metrics.processed.inc_by(starts.len() as u64);
        self.metrics
            .duplicates
            .inc_by((total - starts.len()) as u64);
        self.metrics.batch_size.observe(total as f64);
        self.health.set_database(true);
    }

    /// Processes one record in its own transaction. Returns a rewind when the partition was paused.
    async fn process_one(
        &self,
        consumer: &KafkaConsumer,
        m: &BorrowedMessage<'_>,
        attempt: u32,
    ) -> Option<Rewind> {
        let next = match decode(m) {
            Err(undecodable) => Next::DeadLetter(undecodable.to_string()),
            Ok(msg) => match self.attempt(&msg).await {
                Ok(Attempt::Duplicate) => {
                    self.committed(&[], 1);
                    Next::Done
                }
                Ok(Attempt::Handled(result)) => self.decide(&msg, result, attempt),
                Err(e) => {
                    let slot = (m.topic().to_owned(), m.partition());
                    return Some(self.database_error(consumer, &slot, m.offset(), &e));
                }
            },
        };
        self.conclude(consumer, m, next, attempt).await
    }

    /// What follows attempt number `attempt` at `msg`.
    fn decide(&self, msg: &Message, result: Result<(), HandlerError>, attempt: u32) -> Next {
        let next = decide::after_attempt(&result, attempt, &self.cfg.retry, rand::random::<f64>());
        if let (Err(e), Next::RetryAfter(d)) = (&result, &next) {
            self.metrics.retries.inc();
            tracing::warn!(event_id = %msg.event_id, attempt, "handler failed ({e}); retrying in {d:?}");
        }
        next
    }

    /// Carries out `next` for record `m`: store its offset, rewind for a retry, or dead-letter it.
    async fn conclude(
        &self,
        consumer: &KafkaConsumer,
        m: &BorrowedMessage<'_>,
        next: Next,
        attempt: u32,
    ) -> Option<Rewind> {
        let slot = (m.topic().to_owned(), m.partition());
        let offset = m.offset();
        match next {
            Next::Done => {}
            Next::RetryAfter(d) => {
                return Some(self.rewind(consumer, &slot, offset, d, Some(attempt)));
            }
            Next::DeadLetter(reason) => {
                if let Err(e) = self.dead_letter(m, &reason, attempt).await {
                    // Not durable in the DLQ yet: keep the offset and try again later.
                    let d = decide::backoff(attempt, &self.cfg.retry, rand::random::<f64>());
                    tracing::warn!(
                        topic = slot.0,
                        partition = slot.1,
                        offset,
                        "DLQ publish failed ({e}); retrying in {d:?}"
                    );
                    return Some(self.rewind(consumer, &slot, offset, d, None));
                }
                self.metrics.dead_lettered.inc();
                tracing::warn!(
                    topic = slot.0,
                    partition = slot.1,
                    offset,
                    "sent to {}.dlq: {reason}",
                    slot.0
                );
            }
        }
        self.store_offset(consumer, &slot, offset);
        None
    }

    /// One try: inbox row first; only a new event runs the handler, in the same transaction.
    async fn attempt(&self, msg: &Message) -> Result<Attempt, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !self.inbox.record(&mut tx, &self.cfg.group_id, msg).await? {
            tx.rollback().await?;
            return Ok(Attempt::Duplicate);
        }
        let started = Instant::now();
        let result = self.handle_in_span(msg, &mut tx).await;
        self.metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                tx.commit().await?;
                self.committed(&[started], 1);
            }
            Err(_) => tx.rollback().await?,
        }
        Ok(Attempt::Handled(result))
    }

    /// Marks everything up to and including `offset` as done; librdkafka commits it shortly after.
    fn store_offset(&self, consumer: &KafkaConsumer, slot: &Slot, offset: i64) {
        // The committed offset is the next one to read. `store_offsets` takes it as given (the
        // single-partition `store_offset` adds one itself, an easy way to skip a record).
        let mut tpl = TopicPartitionList::new();
        let next = tpl
            .add_partition_offset(&slot.0, slot.1, Offset::Offset(offset + 1))
            .and_then(|()| consumer.store_offsets(&tpl));
        if let Err(e) = next {
            tracing::warn!(
                topic = slot.0,
                partition = slot.1,
                offset,
                "storing the offset failed (the message may be seen again): {e}"
            );
        }
    }

    /// Pauses the partition and rewinds it to `offset`, so polling goes on for the other partitions and
    /// the message comes back after the delay (never blocking past `max.poll.interval.ms`).
    fn rewind(
        &self,
        consumer: &KafkaConsumer,
        slot: &Slot,
        offset: i64,
        delay: Duration,
        attempts: Option<u32>,
    ) -> Rewind {
        let (topic, partition) = (slot.0.as_str(), slot.1);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(topic, partition, "pause failed: {e}");
        }
        if let Err(e) = consumer.seek(
            topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            tracing::warn!(topic, partition, offset, "seek failed: {e}");
        }
        Rewind {
            offset,
            delay,
            attempts,
        }
    }

    /// Publishes the original record to `<topic>.dlq` with `dlq.*` headers and waits for the ack.
    async fn dead_letter(
        &self,
        m: &BorrowedMessage<'_>,
        reason: &str,
        attempts: u32,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let extra = [
            ("dlq.reason", reason.to_owned()),
            ("dlq.group", self.cfg.group_id.clone()),
            ("dlq.attempts", attempts.to_string()),
            ("dlq.original_partition", m.partition().to_string()),
            ("dlq.original_offset", m.offset().to_string()),
        ];
        for (k, v) in &extra {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let topic = format!("{}.dlq", m.topic());
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        record.key = m.key();
        record.payload = m.payload();
        self.dlq
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
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
