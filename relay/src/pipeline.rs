//! Batches in flight, oldest first, and what each new claim must know about them.
//!
//! Ordering across batches rests on three rules, checked together by the claim (see
//! [`crate::store::Claim`]) and by what the loop withholds in memory:
//! - a batch never carries a key that an earlier batch still has in flight (sent, not acknowledged): a
//!   record that times out must not be overtaken by a later record of its key, and the idempotent
//!   producer keeps order only while it retries, not once a record has failed;
//! - a pending row at or below the claim's start, or in backoff, holds its key back (late commits,
//!   redriven rows, keys unparked by a discard);
//! - keys the batch being committed failed or parked, and keys parked by batches in flight, are withheld
//!   in memory: their rows are not committed yet, so the claim cannot see them.
//!
//! Batches settle oldest first, and a failed settle rolls every batch in flight back. Each claim
//! transaction share-locks the fence row until it commits, so no new holder's epoch lands in between.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::decide::{FailedHeads, TopicKey};
use crate::event::ClaimedEvent;
use crate::producer::Outcome;
use crate::store::{Claim, Fenced, StoreError};

/// A claimed batch whose records are enqueued, waiting for acknowledgments before it settles.
pub(crate) struct InFlight {
    pub(crate) tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub(crate) batch: Vec<ClaimedEvent>,
    pub(crate) deliveries: tokio::task::JoinHandle<Vec<Outcome>>,
    /// Keys this batch parks (see [`crate::decide::parked_keys`]).
    pub(crate) parked: HashSet<TopicKey>,
}

/// A batch whose deliveries all ended; its claim transaction is still open.
pub(crate) struct Acknowledged {
    pub(crate) tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub(crate) batch: Vec<ClaimedEvent>,
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) parked: HashSet<TopicKey>,
}

/// Why the loop rolled every batch in flight back. Each carries its metric label.
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    /// The leadership was lost (Lease, advisory lock): the next holder publishes.
    #[error("leadership lost")]
    Lost,
    /// The fence holds a newer epoch: this relay must not commit.
    #[error(transparent)]
    Fenced(Fenced),
    /// A claim or settle statement failed; the events stay pending.
    #[error("database: {0}")]
    Database(sqlx::Error),
    /// A batch's delivery reports did not all arrive by the producer's deadline: the Kafka client is
    /// stuck (seen with librdkafka after a run of delivery timeouts under idempotence). The process
    /// exits, so a fresh client publishes the rolled-back batches.
    #[error("kafka producer stuck: delivery reports missing after {0:?}")]
    ProducerStuck(Duration),
    /// The idempotent producer raised a fatal error: every later record would fail. The process exits.
    #[error("kafka producer failed fatally: {0}")]
    ProducerFatal(String),
}

impl Abort {
    /// The `reason` label of `outbox_relay_batch_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Fenced(_) => "fenced",
            Self::Database(_) => "database",
            Self::ProducerStuck(_) => "producer_stuck",
            Self::ProducerFatal(_) => "producer_fatal",
        }
    }

    /// Whether the process must exit (its Kafka client cannot be trusted again).
    pub fn ends_process(&self) -> bool {
        matches!(self, Self::ProducerStuck(_) | Self::ProducerFatal(_))
    }
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced(f) => Self::Fenced(f),
            StoreError::Db(e) => Self::Database(e),
        }
    }
}

impl From<sqlx::Error> for Abort {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// How often a busy pipeline still claims from the start of the outbox: rows that were committed late
/// below the batches in flight, or whose retry came due, wait at most this long.
pub(crate) const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Batches in flight, oldest first, and what later batches must know about the earlier ones.
pub(crate) struct Pipeline {
    batches: VecDeque<InFlight>,
    /// Heads whose delivery failed in batches settled while later ones were in flight (an
    /// acknowledgment of a later record of such a key is an order violation, counted).
    failed: FailedHeads,
    /// When the last claim scanned from the start of the outbox.
    last_full_scan: Instant,
    /// The last claim above the batches in flight came back short: scan from the start next.
    full_scan_due: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            batches: VecDeque::new(),
            failed: FailedHeads::new(),
            last_full_scan: Instant::now(),
            full_scan_due: true,
        }
    }
}

impl Pipeline {
    /// Batches in flight.
    pub(crate) fn len(&self) -> usize {
        self.batches.len()
    }

    /// Whether nothing is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The next claim, made while `settling` (the acknowledged batch) commits, if any: its rows count as
    /// in hand (conservatively: its keys go out with the claim after). While batches
    /// are in flight their rows are locked, and a claim from the start would step over every one of
    /// them (`SKIP LOCKED` still visits each row); claiming above the highest id in hand skips that
    /// work. Rows below it that are not in hand hold their keys back and are picked up by a scan from
    /// the start, at least every [`FULL_SCAN_EVERY`] and whenever a claim above came back short.
    pub(crate) fn next_claim(&self, settling: Option<&Acknowledged>) -> Claim {
        let in_hand = self
            .batches
            .iter()
            .map(|b| &b.batch)
            .chain(settling.map(|a| &a.batch))
            .flat_map(|b| b.iter().map(|e| e.id));
        let highest = in_hand.clone().max();
        match highest {
            Some(id) if !self.full_scan_due && self.last_full_scan.elapsed() < FULL_SCAN_EVERY => {
                Claim {
                    after: id,
                    in_flight: vec![],
                }
            }
            _ => Claim {
                after: 0,
                in_flight: in_hand.collect(),
            },
        }
    }

    /// Keys a new batch must withhold although the claim let them through: those parked by batches in
    /// flight and, when a batch is being committed, those it failed or parked.
    pub(crate) fn withheld(
        &self,
        settling: Option<(&Acknowledged, &HashSet<TopicKey>)>,
    ) -> HashSet<TopicKey> {
        let mut keys: HashSet<TopicKey> = self
            .batches
            .iter()
            .flat_map(|b| b.parked.iter().cloned())
            .collect();
        if let Some((acked, failed)) = settling {
            keys.extend(acked.parked.iter().cloned());
            keys.extend(failed.iter().cloned());
        }
        keys
    }

    /// Takes the result of a claim that started at `after`: the batch joins the pipeline (when there is
    /// one). Returns whether the claim came back full (more is likely waiting).
    pub(crate) fn admit(&mut self, after: i64, batch: Option<InFlight>, batch_size: i64) -> bool {
        let full = batch
            .as_ref()
            .is_some_and(|b| b.batch.len() as i64 >= batch_size);
        if after == 0 {
            self.last_full_scan = Instant::now();
            self.full_scan_due = false;
        } else if !full {
            self.full_scan_due = true;
        }
        if let Some(b) = batch {
            self.batches.push_back(b);
        }
        full
    }

    /// The oldest batch, to be acknowledged and settled.
    pub(crate) fn pop_oldest(&mut self) -> Option<InFlight> {
        self.batches.pop_front()
    }

    /// Heads whose delivery failed in batches settled while later ones were in flight.
    pub(crate) fn failed_before(&self) -> &FailedHeads {
        &self.failed
    }

    /// Takes the failed heads after a settled batch; forgotten once nothing is in flight.
    pub(crate) fn settled(&mut self, heads: FailedHeads) {
        self.failed = if self.batches.is_empty() {
            FailedHeads::new()
        } else {
            heads
        };
    }

    /// Rolls back every batch in flight (dropping a transaction rolls it back): their events stay pending
    /// and are published again; records already sent become duplicates, never losses.
    pub(crate) fn abort(&mut self) -> usize {
        let n = self.batches.len();
        self.batches.clear();
        self.failed.clear();
        n
    }
}
