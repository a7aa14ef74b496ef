//! The consume loop: inbox row + handler effects in one transaction, then the offset.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::SchemaName;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::decide::{self, HandlerError, Next, RetryPolicy};
use crate::inbox::Inbox;
use crate::message::{decode, Message};
use crate::metrics::Metrics;

/// Application logic run for each new event, inside the transaction that also records the inbox row.
/// Write effects through `tx`; return `Err` to roll them back.
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
}

/// Commits stored offsets before partitions are taken away, so the next owner starts after them.
struct RebalanceCommit {
    group: String,
}

impl ClientContext for RebalanceCommit {}

impl ConsumerContext for RebalanceCommit {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions revoked; committing processed offsets");
                commit_stored(consumer);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(group = %self.group, "rebalance error: {e}"),
        }
    }
}

fn commit_stored<C: ConsumerContext, T: Consumer<C>>(consumer: &T) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!("offset commit failed: {e}"),
    }
}

/// How one attempt at a message ended.
enum Attempt {
    /// The inbox already had it: skipped.
    Duplicate,
    /// The handler ran; effects committed on `Ok`, rolled back on `Err`.
    Handled(Result<(), HandlerError>),
}

/// A consumer group member: one Kafka consumer, one database pool, one handler.
pub struct Runtime<H: Handler> {
    cfg: RuntimeConfig,
    pool: PgPool,
    inbox: Inbox,
    handler: H,
    metrics: Arc<Metrics>,
    dlq: FutureProducer,
}

/// Per-partition retry state: the offset being retried and the attempts made.
type RetryState = HashMap<(String, i32), (i64, u32)>;

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
            dlq,
        })
    }

    fn consumer(&self) -> Result<StreamConsumer<RebalanceCommit>, KafkaError> {
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
            .set(
                "session.timeout.ms",
                self.cfg.session_timeout.as_millis().to_string(),
            );
        for (k, v) in &self.cfg.kafka_extra {
            c.set(k, v);
        }
        c.create_with_context(RebalanceCommit {
            group: self.cfg.group_id.clone(),
        })
    }

    /// Consumes until `shutdown`, then commits what is done and leaves the group.
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let consumer = self.consumer()?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(group = %self.cfg.group_id, instance = %self.cfg.instance_id, ?topics, "consuming");
        let mut retry: RetryState = HashMap::new();
        let mut resumes: Vec<(Instant, String, i32)> = Vec::new();
        loop {
            let next_resume = resumes.iter().map(|r| r.0).min();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep_until(next_resume) => {
                    let now = Instant::now();
                    for (_, topic, partition) in resumes.iter().filter(|r| r.0 <= now) {
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(topic, *partition);
                        // Fails harmlessly when the partition was revoked meanwhile.
                        let _ = consumer.resume(&tpl);
                    }
                    resumes.retain(|r| r.0 > now);
                }
                m = consumer.recv() => match m {
                    Ok(m) => {
                        if let Some((delay, topic, partition)) = self.process(&consumer, &m, &mut retry).await {
                            resumes.push((Instant::now() + delay, topic, partition));
                        }
                    }
                    Err(e) => tracing::warn!("consume error: {e}"),
                },
            }
        }
        commit_stored(&consumer);
        Ok(())
    }

    /// Processes one record. Returns a resume (delay, topic, partition) when the partition was paused.
    async fn process(
        &self,
        consumer: &StreamConsumer<RebalanceCommit>,
        m: &BorrowedMessage<'_>,
        retry: &mut RetryState,
    ) -> Option<(Duration, String, i32)> {
        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
        let slot = (topic.clone(), partition);
        let attempt = match retry.get(&slot) {
            Some((o, a)) if *o == offset => a + 1,
            _ => 1,
        };
        let next = match decode(m) {
            Err(undecodable) => Next::DeadLetter(undecodable.to_string()),
            Ok(msg) => match self.attempt(&msg).await {
                Ok(Attempt::Duplicate) => {
                    self.metrics.duplicates.inc();
                    Next::Done
                }
                Ok(Attempt::Handled(result)) => {
                    let next = decide::after_attempt(
                        &result,
                        attempt,
                        &self.cfg.retry,
                        rand::random::<f64>(),
                    );
                    match (&result, &next) {
                        (Ok(()), _) => {
                            self.metrics.processed.inc();
                        }
                        (Err(e), Next::RetryAfter(d)) => {
                            self.metrics.retries.inc();
                            tracing::warn!(event_id = %msg.event_id, attempt, "handler failed ({e}); retrying in {d:?}");
                        }
                        _ => {}
                    }
                    next
                }
                // Database trouble is never the message's fault: retry without counting an attempt.
                Err(e) => {
                    self.metrics.database_errors.inc();
                    let d = decide::backoff(1, &self.cfg.retry, rand::random::<f64>());
                    tracing::warn!(event_id = %msg.event_id, "database error ({e}); retrying in {d:?}");
                    return Some(self.rewind(consumer, &topic, partition, offset, d));
                }
            },
        };
        match next {
            Next::Done => {}
            Next::RetryAfter(d) => {
                retry.insert(slot, (offset, attempt));
                return Some(self.rewind(consumer, &topic, partition, offset, d));
            }
            Next::DeadLetter(reason) => {
                if let Err(e) = self.dead_letter(m, &reason, attempt).await {
                    // Not durable in the DLQ yet: keep the offset and try again later.
                    let d = decide::backoff(attempt, &self.cfg.retry, rand::random::<f64>());
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        "DLQ publish failed ({e}); retrying in {d:?}"
                    );
                    return Some(self.rewind(consumer, &topic, partition, offset, d));
                }
                self.metrics.dead_lettered.inc();
                tracing::warn!(topic, partition, offset, "sent to {topic}.dlq: {reason}");
            }
        }
        retry.remove(&slot);
        if let Err(e) = consumer.store_offset(&topic, partition, offset + 1) {
            tracing::warn!(
                topic,
                partition,
                offset,
                "storing the offset failed (the message may be seen again): {e}"
            );
        }
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
        let result = self.handler.handle(msg, &mut tx).await;
        match result {
            Ok(()) => tx.commit().await?,
            Err(_) => tx.rollback().await?,
        }
        self.metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(Attempt::Handled(result))
    }

    /// Pauses the partition and rewinds it to `offset`, so polling goes on for the other partitions and
    /// the message comes back after the delay (never blocking past `max.poll.interval.ms`).
    fn rewind(
        &self,
        consumer: &StreamConsumer<RebalanceCommit>,
        topic: &str,
        partition: i32,
        offset: i64,
        delay: Duration,
    ) -> (Duration, String, i32) {
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
        (delay, topic.to_owned(), partition)
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
