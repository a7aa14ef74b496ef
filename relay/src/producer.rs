//! The idempotent Kafka producer: builds records from claimed events, sends a batch and collects every
//! delivery report.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientContext;

use crate::decide::{DeadReason, Delivery, Fault};
use crate::event::ClaimedEvent;
use crate::health::Health;

/// How records are assigned to partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Partitioning {
    /// By record key, murmur2 as the Java client does (librdkafka `murmur2_random`). Keeps per-key order.
    Key,
    /// Partitions in turn, ignoring the key. No per-key order across partitions.
    RoundRobin,
    /// By murmur2 of the event type: all events of a type share a partition.
    EventType,
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Extra librdkafka properties (SASL, TLS, ...), applied last.
    pub extra: Vec<(String, String)>,
    /// `message.timeout.ms`: how long a record may wait for its acknowledgment.
    pub delivery_timeout: Duration,
    /// `linger.ms`.
    pub linger: Duration,
    /// `message.max.bytes`, also used to dead-letter oversized events before sending.
    pub max_message_bytes: usize,
    /// Partition assignment.
    pub partitioning: Partitioning,
}

impl KafkaSettings {
    /// The librdkafka configuration of the relay's producer.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            )
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .set("queue.buffering.max.messages", "200000");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

/// Reports broker-wide trouble into the health state.
pub struct RelayContext {
    health: Arc<Health>,
}

impl ClientContext for RelayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_broker(false);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

/// Sorts a delivery error into a metrics label and whose fault it is: one cause, one reason. Only errors
/// about the record itself or its topic count toward `--max-attempts` (a topic that does not exist or
/// may not be written), and those certain to repeat dead-letter it at once. Everything else — timeouts,
/// transport, leaders, replicas, throttling, the producer's own state (an epoch fenced or bumped after an
/// outage is [`Fault::Producer`]: the process restarts when it repeats), codes this list does not
/// know — is the broker's or the client's, counts no attempt, and pauses claiming: a misjudged broker
/// fault costs a wait, a misjudged record fault would dead-letter and park healthy keys.
pub fn classify(err: &KafkaError) -> (String, Fault) {
    use RDKafkaErrorCode as C;
    let Some(code) = err.rdkafka_error_code() else {
        return ("client".into(), Fault::Broker);
    };
    let fault = match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize => {
            Fault::Permanent(DeadReason::TooLarge)
        }
        C::InvalidTopic => Fault::Permanent(DeadReason::InvalidTopic),
        C::InvalidRecord
        | C::InvalidMessage
        | C::UnsupportedForMessageFormat
        | C::BadMessage
        | C::InvalidTimestamp => Fault::Permanent(DeadReason::Rejected),
        C::TopicAuthorizationFailed
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::PolicyViolation => Fault::Record,
        C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerIdMapping
        | C::Fatal => Fault::Producer,
        _ => Fault::Broker,
    };
    (format!("{code:?}"), fault)
}

/// The relay's producer.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<RelayContext>,
    settings: KafkaSettings,
    round_robin: Arc<AtomicU32>,
    partition_counts: Arc<Mutex<HashMap<String, (i32, Instant)>>>,
}

/// A delivery outcome and when it was known.
pub type Outcome = (Delivery, DateTime<Utc>);

impl Producer {
    /// How long every delivery report of a batch may take: librdkafka reports each record by its
    /// delivery timeout, so a report missing well past it means the client itself is stuck. Shorter than
    /// the claim transaction's idle timeout ([`crate::store::idle_in_transaction_timeout`]).
    pub fn delivery_deadline(&self) -> Duration {
        self.settings.delivery_timeout + Duration::from_secs(20)
    }

    /// Creates the producer (no network IO yet).
    pub fn new(settings: KafkaSettings, health: Arc<Health>) -> Result<Self, KafkaError> {
        let inner = settings
            .client_config()
            .create_with_context(RelayContext { health })?;
        Ok(Self {
            inner,
            settings,
            round_robin: Arc::default(),
            partition_counts: Arc::default(),
        })
    }

    /// Whether a broker answers a metadata request within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<(), KafkaError> {
        let p = self.inner.clone();
        tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, timeout).map(|_| ()))
            .await
            .expect("metadata probe panicked")
    }

    /// Partition count of `topic`, cached for a minute; `None` when unknown.
    async fn partitions(&self, topic: &str) -> Option<i32> {
        if let Some((n, at)) = self.partition_counts.lock().unwrap().get(topic) {
            if at.elapsed() < Duration::from_secs(60) {
                return Some(*n);
            }
        }
        let p = self.inner.clone();
        let t = topic.to_owned();
        let n = tokio::task::spawn_blocking(move || {
            let md = p
                .client()
                .fetch_metadata(Some(&t), Duration::from_secs(5))
                .ok()?;
            // A topic-level error (no leader, unknown topic) makes the count untrustworthy: wait.
            let t = md.topics().first().filter(|t| t.error().is_none())?;
            let n = t.partitions().len() as i32;
            (n > 0).then_some(n)
        })
        .await
        .ok()
        .flatten()?;
        self.partition_counts
            .lock()
            .unwrap()
            .insert(topic.to_owned(), (n, Instant::now()));
        Some(n)
    }

    /// The partition the relay chooses itself (`Ok(None)`: librdkafka's key partitioner). `Err` when the
    /// partition count is unknown: the record waits rather than falling back to another partitioner,
    /// which would put it on a different partition than its predecessors.
    async fn explicit_partition(&self, ev: &ClaimedEvent) -> Result<Option<i32>, Delivery> {
        if self.settings.partitioning == Partitioning::Key {
            return Ok(None);
        }
        let Some(n) = self.partitions(&ev.topic).await else {
            return Err(partition_unknown(&ev.topic));
        };
        Ok(Some(match self.settings.partitioning {
            Partitioning::Key => unreachable!("returned above"),
            Partitioning::RoundRobin => {
                (self.round_robin.fetch_add(1, Ordering::Relaxed) % n as u32) as i32
            }
            Partitioning::EventType => {
                let basis = ev.event_type.as_deref().unwrap_or(&ev.key);
                java_partition(basis.as_bytes(), n)
            }
        }))
    }

    /// Sends every event whose slot is `None`, then awaits all delivery reports. Returns one outcome per
    /// event: pre-decided slots are passed through.
    pub async fn send_all(
        &self,
        batch: &[ClaimedEvent],
        slots: Vec<Option<Delivery>>,
    ) -> Vec<Outcome> {
        self.enqueue_all(batch, slots)
            .await
            .await
            .expect("delivery collector panicked")
    }

    /// Enqueues every event whose slot is `None` (in batch order, so records of one partition keep id
    /// order) and returns a task that collects the delivery reports, stamping each when it arrives.
    pub async fn enqueue_all(
        &self,
        batch: &[ClaimedEvent],
        slots: Vec<Option<Delivery>>,
    ) -> tokio::task::JoinHandle<Vec<Outcome>> {
        let mut pending = Vec::with_capacity(batch.len());
        // Once a topic's partition count is unknown, the rest of its records in this batch wait too: a
        // later one must not go out while an earlier one waits.
        let mut unpartitioned: Vec<&str> = Vec::new();
        for (ev, slot) in batch.iter().zip(slots) {
            if let Some(decided) = slot {
                pending.push(Err(decided));
                continue;
            }
            if unpartitioned.contains(&ev.topic.as_str()) {
                pending.push(Err(partition_unknown(&ev.topic)));
                continue;
            }
            let partition = match self.explicit_partition(ev).await {
                Ok(p) => p,
                Err(waits) => {
                    unpartitioned.push(&ev.topic);
                    pending.push(Err(waits));
                    continue;
                }
            };
            pending.push(
                self.enqueue(&ev.topic, ev, partition, &ev.payload, &ev.kafka_headers())
                    .await,
            );
        }
        let waits = pending.into_iter().map(|p| async move {
            let delivery = match p {
                Err(decided) => decided,
                Ok(fut) => delivery_of(fut).await,
            };
            (delivery, Utc::now())
        });
        tokio::spawn(futures::future::join_all(waits))
    }

    /// Enqueues one record, waiting while the local queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        ev: &ClaimedEvent,
        partition: Option<i32>,
        payload: &[u8],
        headers: &[(String, String)],
    ) -> Result<rdkafka::producer::DeliveryFuture, Delivery> {
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            kafka_headers = kafka_headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic)
            .key(ev.key.as_bytes())
            .payload(payload)
            .headers(kafka_headers)
            .timestamp(ev.created_at.timestamp_millis());
        record.partition = partition;
        loop {
            match self.inner.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(failed(&e)),
            }
        }
    }

    /// Publishes a dead event to `<topic>.dlq` with error headers (`reason` as stored in
    /// `outbox.dead.reason`); the payload is left out only when its size was the reason.
    pub async fn send_dlq(
        &self,
        ev: &ClaimedEvent,
        reason: &str,
        error: &str,
    ) -> Result<(), String> {
        let topic = dlq_topic(&ev.topic);
        let mut headers = ev.kafka_headers();
        headers.push(("outbox.reason".into(), reason.into()));
        headers.push(("outbox.error".into(), error.into()));
        headers.push(("outbox.attempts".into(), (ev.attempts + 1).to_string()));
        headers.push(("outbox.original_topic".into(), ev.topic.clone()));
        let payload: &[u8] = if reason == DeadReason::TooLarge.as_str() {
            &[]
        } else {
            &ev.payload
        };
        let delivery = match self.enqueue(&topic, ev, None, payload, &headers).await {
            Ok(fut) => delivery_of(fut).await,
            Err(d) => d,
        };
        match delivery {
            Delivery::Acked { .. } => Ok(()),
            Delivery::Failed { error, .. } => Err(error),
            Delivery::Withheld => Err("withheld".into()),
        }
    }

    /// Sends a record to an arbitrary topic (replay), keeping key, headers and timestamp.
    pub async fn send_to(
        &self,
        topic: &str,
        ev: &ClaimedEvent,
        extra: &[(String, String)],
    ) -> Delivery {
        let mut headers = ev.kafka_headers();
        headers.extend_from_slice(extra);
        match self.enqueue(topic, ev, None, &ev.payload, &headers).await {
            Ok(fut) => delivery_of(fut).await,
            Err(d) => d,
        }
    }

    /// The producer's fatal error, if it raised one (the idempotent producer's state is then lost and
    /// every later record fails): the process must exit so a fresh producer publishes again.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Waits for outstanding records (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Waits for one delivery report.
async fn delivery_of(fut: rdkafka::producer::DeliveryFuture) -> Delivery {
    match fut.await {
        Ok(Ok(d)) => Delivery::Acked {
            partition: d.partition,
            offset: d.offset,
        },
        Ok(Err((e, _))) => failed(&e),
        Err(_) => dropped_report(),
    }
}

fn failed(e: &KafkaError) -> Delivery {
    let (code, fault) = classify(e);
    Delivery::Failed {
        error: e.to_string(),
        code,
        fault,
    }
}

fn dropped_report() -> Delivery {
    Delivery::Failed {
        error: "producer dropped the delivery report".into(),
        code: "dropped".into(),
        fault: Fault::Broker,
    }
}

/// The partition count of the topic could not be read (a metadata failure): the broker's fault.
fn partition_unknown(topic: &str) -> Delivery {
    Delivery::Failed {
        error: format!(
            "partition count of `{topic}` unknown (metadata unavailable); the record waits"
        ),
        code: "partition_unknown".into(),
        fault: Fault::Broker,
    }
}

/// The Java client's default partition for a key: `toPositive(murmur2(key)) % partitions`.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (hash % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors from Apache Kafka's UtilsTest (signed Java ints).
        let cases: [(&[u8], i32); 5] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32,
                want,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        assert_eq!(
            java_partition(b"21", 10),
            ((-973932308i32 as u32 & 0x7fff_ffff) % 10) as i32
        );
    }

    #[test]
    fn errors_are_classified() {
        let fault = |c| classify(&KafkaError::MessageProduction(c)).1;
        use RDKafkaErrorCode as C;
        assert_eq!(
            fault(C::MessageSizeTooLarge),
            Fault::Permanent(DeadReason::TooLarge)
        );
        assert_eq!(
            fault(C::InvalidTopic),
            Fault::Permanent(DeadReason::InvalidTopic)
        );
        // One reason per cause: a record the broker refuses as invalid is not "too large".
        assert_eq!(
            fault(C::InvalidRecord),
            Fault::Permanent(DeadReason::Rejected)
        );
        // The broker's and the network's faults never count toward max attempts.
        for c in [
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::RequestTimedOut,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::ThrottlingQuotaExceeded,
            C::PurgeQueue,
        ] {
            assert_eq!(fault(c), Fault::Broker, "{c:?}");
        }
        // The producer's own state: the process restarts it (seen in the soak: tansu fenced the
        // producer's epoch after an outage, and every later record failed the same way).
        for c in [C::ProducerFenced, C::OutOfOrderSequenceNumber, C::Fatal] {
            assert_eq!(fault(c), Fault::Producer, "{c:?}");
        }
        assert_eq!(fault(C::UnknownTopicOrPartition), Fault::Record);
        assert_eq!(fault(C::TopicAuthorizationFailed), Fault::Record);
        let timeout = KafkaError::MessageProduction(C::MessageTimedOut);
        assert_eq!(classify(&timeout).0, "MessageTimedOut");
    }
}
