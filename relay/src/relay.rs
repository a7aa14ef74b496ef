//! The claim → produce → settle loop, and the monitors that feed health and metrics.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::SchemaName;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, Leadership};
use crate::decide::{self, RetryPolicy, Settle, TopicKey};
use crate::health::{Health, Role};
use crate::metrics::{Metrics, Reason};
use crate::producer::Producer;
use crate::retention;
use crate::store::{Retention, Store, StoreError};

/// Settings of the publish loop.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Outbox schema.
    pub schema: SchemaName,
    /// Events claimed per transaction.
    pub batch_size: i64,
    /// Wait between polls when the outbox is drained (a NOTIFY cuts it short).
    pub poll_interval: Duration,
    /// LISTEN for the insert trigger's NOTIFY.
    pub notify: bool,
    /// Retries, backoff, poison policy.
    pub retry: RetryPolicy,
    /// Publish dead events to `<topic>.dlq`.
    pub dlq: bool,
    /// Delete or archive delivered rows.
    pub retention: Retention,
    /// Fence scope (one per group of relays sharing an outbox).
    pub fence_scope: String,
    /// Producer `message.max.bytes`, checked before sending.
    pub max_message_bytes: usize,
    /// Batches claimed and sent before the oldest one is acknowledged (1: one at a time). Deeper pipelines
    /// overlap the database's work with the broker's acknowledgments; at any depth the claim of the next
    /// batch overlaps the commit of the acknowledged one.
    pub in_flight_batches: usize,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Events claimed.
    pub claimed: usize,
    /// Events acknowledged and settled.
    pub delivered: usize,
    /// Events scheduled for retry.
    pub retried: usize,
    /// Events dead-lettered.
    pub dead: usize,
}

/// A relay bound to a database and a producer.
pub struct Relay {
    cfg: RelayConfig,
    pool: PgPool,
    store: Store,
    producer: Producer,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    ack_observer: Option<AckObserver>,
}

/// A claimed batch whose records are enqueued, waiting for acknowledgments before it settles.
struct InFlight {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    batch: Vec<crate::event::ClaimedEvent>,
    deliveries: tokio::task::JoinHandle<Vec<crate::producer::Outcome>>,
    /// Keys this batch parks (see [`decide::parked_keys`]).
    parked: HashSet<TopicKey>,
}

/// A batch whose deliveries all ended; its claim transaction is still open.
struct Acknowledged {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    batch: Vec<crate::event::ClaimedEvent>,
    outcomes: Vec<crate::producer::Outcome>,
    parked: HashSet<TopicKey>,
}

/// Batches in flight, oldest first, and what later batches must know about the earlier ones.
///
/// Ordering across batches: batch N+1 is claimed only after every record of batch N was handed to the one
/// idempotent producer, so records of a key reach their partition in id order; keys batch N parks are
/// withheld from N+1 (the `outbox.dead` row that makes the claim skip them is not committed yet); batches
/// settle oldest first, and a failed settle rolls every batch in flight back. Fencing: each claim
/// transaction share-locks the fence row until it commits, so no new holder's epoch can land before any
/// of these commits.
struct Pipeline {
    batches: VecDeque<InFlight>,
    /// Keys whose delivery failed in batches settled while later ones were in flight.
    failed: HashSet<TopicKey>,
    /// When the last claim scanned from the start of the outbox (see [`Pipeline::claim_after`]).
    last_full_scan: Instant,
    /// The last claim above the batches in flight came back short: scan from the start next.
    full_scan_due: bool,
}

/// How often a busy pipeline still claims from the start of the outbox: rows that were committed late
/// below the batches in flight, or whose retry came due, wait at most this long.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            batches: VecDeque::new(),
            failed: HashSet::new(),
            last_full_scan: Instant::now(),
            full_scan_due: true,
        }
    }
}

impl Pipeline {
    /// Where the next claim starts. While batches are in flight their rows are locked, and a claim from
    /// the start would step over every one of them (`SKIP LOCKED` still visits each row); claiming above
    /// the highest id in flight skips that work. Rows below it that are not in flight (late commits,
    /// retries come due) are picked up by a scan from the start, at least every [`FULL_SCAN_EVERY`] and
    /// whenever a claim above came back short.
    fn claim_after(&self, committing: Option<i64>) -> i64 {
        let highest = self
            .batches
            .iter()
            .filter_map(|b| b.batch.last().map(|e| e.id))
            .chain(committing)
            .max();
        match highest {
            Some(id) if !self.full_scan_due && self.last_full_scan.elapsed() < FULL_SCAN_EVERY => {
                id
            }
            _ => 0,
        }
    }

    /// Records how a claim that started at `after` came back.
    fn claimed(&mut self, after: i64, full: bool) {
        if after == 0 {
            self.last_full_scan = Instant::now();
            self.full_scan_due = false;
        } else if !full {
            self.full_scan_due = true;
        }
    }

    fn parked(&self) -> HashSet<TopicKey> {
        self.batches
            .iter()
            .flat_map(|b| b.parked.iter().cloned())
            .collect()
    }

    /// Rolls back every batch in flight (dropping a transaction rolls it back): their events stay pending
    /// and are published again; records already sent become duplicates, never losses.
    fn abort(&mut self) -> usize {
        let n = self.batches.len();
        self.batches.clear();
        self.failed.clear();
        n
    }
}

/// How a step of the publish loop ended when leadership can be lost during it.
enum Guarded<T> {
    Done(T),
    Lost,
}

async fn unless_lost<T>(
    lost: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Guarded<T> {
    tokio::select! {
        biased;
        _ = lost.cancelled() => Guarded::Lost,
        r = f => Guarded::Done(r),
    }
}

/// Receives every commit→ack latency in seconds (benchmarks need exact samples, not histogram buckets).
pub type AckObserver = Arc<dyn Fn(f64) + Send + Sync>;

impl Relay {
    /// Builds a relay; nothing runs until [`Relay::run`].
    pub fn new(
        cfg: RelayConfig,
        pool: PgPool,
        producer: Producer,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let store = Store::new(cfg.schema.clone());
        Self {
            cfg,
            pool,
            store,
            producer,
            metrics,
            health,
            ack_observer: None,
        }
    }

    /// Also reports each commit→ack latency to `observer`.
    pub fn with_ack_observer(mut self, observer: AckObserver) -> Self {
        self.ack_observer = Some(observer);
        self
    }

    /// The SQL store (for tools and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Publishes until `shutdown`: acquire leadership, loop over batches until it is lost, release, repeat.
    /// On shutdown the in-flight batch is finished before returning. Fails (after rolling back and
    /// releasing the leadership) when the Kafka producer is stuck ([`StoreError::ProducerStuck`]).
    pub async fn run(
        &self,
        coordinator: &mut dyn Coordinator,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let Some(leadership) = coordinator.acquire(&shutdown).await? else {
                break;
            };
            self.health.set_role(Role::Active);
            self.metrics.active.set(1);
            self.maintain_archive().await;
            let published = self.publish_while(&leadership, &shutdown).await;
            self.metrics.in_flight_batches.set(0);
            self.metrics.active.set(0);
            self.health
                .set_role(Role::Standby("leadership released".into()));
            coordinator.release().await;
            // A stuck producer cannot be trusted again: exit, so a fresh process (its pod restarted)
            // publishes the rolled-back batches.
            published?;
            if shutdown.is_cancelled() {
                break;
            }
            tracing::warn!("leadership lost; standing by");
        }
        self.producer.flush(Duration::from_secs(10));
        Ok(())
    }

    async fn maintain_archive(&self) {
        if let Retention::Archive { ttl_days } = self.cfg.retention {
            if let Err(e) = retention::maintain(&self.pool, &self.cfg.schema, ttl_days, None).await
            {
                tracing::warn!("archive maintenance failed: {e}");
            }
        }
    }

    /// Publishes batch after batch until shutdown or loss of leadership, with up to
    /// [`RelayConfig::in_flight_batches`] batches claimed and sent before the oldest settles. Losing the
    /// leadership rolls every batch in flight back at once (and frees the fence row the next holder waits
    /// for); a shutdown settles them first.
    async fn publish_while(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let lost = &leadership.lost;
        let depth = self.cfg.in_flight_batches.max(1);
        let mut pipeline = Pipeline::default();
        let mut listener = None;
        let mut errors = 0u32;
        let mut last_maintenance = Instant::now();
        loop {
            self.metrics
                .in_flight_batches
                .set(pipeline.batches.len() as i64);
            if lost.is_cancelled() {
                self.aborted(&mut pipeline, "lost");
                self.metrics.in_flight_batches.set(0);
                return Ok(());
            }
            let stopping = shutdown.is_cancelled();
            if stopping && pipeline.batches.is_empty() {
                return Ok(());
            }
            if self.cfg.notify && listener.is_none() && !stopping {
                listener = self.listen().await;
            }
            if pipeline.batches.is_empty() && last_maintenance.elapsed() > Duration::from_secs(3600)
            {
                self.maintain_archive().await;
                last_maintenance = Instant::now();
            }
            // Fill the pipeline while claims come back full (more is likely waiting).
            let mut failure = None;
            while !stopping && pipeline.batches.len() < depth {
                let parked = pipeline.parked();
                let after = pipeline.claim_after(None);
                match unless_lost(lost, self.claim_and_send(leadership.epoch, &parked, after)).await
                {
                    Guarded::Lost => break,
                    Guarded::Done(Ok(None)) => {
                        pipeline.claimed(after, false);
                        break;
                    }
                    Guarded::Done(Ok(Some(b))) => {
                        let full = b.batch.len() as i64 >= self.cfg.batch_size;
                        pipeline.claimed(after, full);
                        pipeline.batches.push_back(b);
                        self.metrics
                            .in_flight_batches
                            .set(pipeline.batches.len() as i64);
                        if !full {
                            break;
                        }
                    }
                    Guarded::Done(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if failure.is_none() && !lost.is_cancelled() {
                if let Some(oldest) = pipeline.batches.pop_front() {
                    let span = batch_span(&oldest, leadership.epoch);
                    let acked = match unless_lost(lost, self.acknowledged(oldest)).await {
                        Guarded::Lost => continue, // aborts at the top of the loop
                        Guarded::Done(Ok(acked)) => acked,
                        Guarded::Done(Err(e)) => {
                            self.aborted(&mut pipeline, "producer_stuck");
                            return Err(e.into());
                        }
                    };
                    let settle_plan = self.settle_plan(&acked, &pipeline.failed);
                    // The next claim overlaps this commit (the database works on both at once). It must not
                    // take a key this batch failed or parked, nor one a batch still in flight parks: none of
                    // those rows is committed yet, so the claim's own exclusions cannot see them.
                    let overlap = !stopping && pipeline.batches.len() < depth;
                    let after = pipeline.claim_after(acked.batch.last().map(|e| e.id));
                    let mut withheld = pipeline.parked();
                    withheld.extend(acked.parked.iter().cloned());
                    withheld.extend(settle_plan.failed_keys.iter().cloned());
                    let settling = tracing::Instrument::instrument(
                        self.commit_settle(acked, settle_plan),
                        span,
                    );
                    let claiming = async {
                        match overlap {
                            true => Some(
                                self.claim_and_send(leadership.epoch, &withheld, after)
                                    .await,
                            ),
                            false => None,
                        }
                    };
                    let both = async { tokio::join!(settling, claiming) };
                    if let Guarded::Done((settled, claimed)) = unless_lost(lost, both).await {
                        match claimed {
                            Some(Ok(Some(b))) => {
                                let full = b.batch.len() as i64 >= self.cfg.batch_size;
                                pipeline.claimed(after, full);
                                pipeline.batches.push_back(b);
                            }
                            Some(Ok(None)) => pipeline.claimed(after, false),
                            Some(Err(e)) => failure = Some(e),
                            None => {}
                        }
                        match settled {
                            Ok((_, failed)) => {
                                errors = 0;
                                if pipeline.batches.is_empty() {
                                    pipeline.failed.clear();
                                } else {
                                    pipeline.failed.extend(failed);
                                }
                            }
                            Err(e) => failure = Some(e),
                        }
                        if failure.is_none() {
                            continue;
                        }
                    }
                }
            }
            if lost.is_cancelled() {
                continue; // aborts at the top of the loop
            }
            let wait = match failure {
                None => self.cfg.poll_interval,
                Some(e @ StoreError::ProducerStuck(_)) => {
                    self.aborted(&mut pipeline, "producer_stuck");
                    return Err(e.into());
                }
                Some(StoreError::Fenced(f)) => {
                    tracing::error!("{f}; stopping publishing");
                    self.aborted(&mut pipeline, "fenced");
                    lost.cancel();
                    return Ok(());
                }
                Some(StoreError::Db(e)) => {
                    // Later batches must not commit past an earlier one that failed.
                    self.aborted(&mut pipeline, "database");
                    errors += 1;
                    if is_missing_partition(&e) {
                        self.maintain_archive().await;
                    }
                    let wait = process_kit::backoff::exponential(
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                        errors,
                    );
                    tracing::warn!("batch failed (database: {e}); its events stay pending; retrying in {wait:?}");
                    wait
                }
            };
            if stopping {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
                woke = next_notification(&mut listener) => {
                    if !woke {
                        listener = None;
                    }
                }
            }
        }
    }

    /// Rolls the pipeline back; counts the batches dropped for a lost leadership, or the failure.
    fn aborted(&self, pipeline: &mut Pipeline, reason: &str) {
        let dropped = pipeline.abort();
        let count = if reason == "lost" {
            if dropped > 0 {
                tracing::warn!(
                    batches = dropped,
                    "leadership lost; rolling the batches in flight back"
                );
            }
            dropped as u64
        } else {
            1
        };
        if count > 0 {
            self.metrics
                .batch_errors
                .get_or_create(&Reason::of(reason))
                .inc_by(count);
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let channel = outbox::notify_channel(&self.cfg.schema);
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(&channel).await.ok()?;
        Some(l)
    }

    /// One claim → produce → settle transaction. Public so tests and tools can drive it.
    pub async fn run_batch(&self, epoch: Option<i64>) -> Result<BatchReport, StoreError> {
        match self.claim_and_send(epoch, &HashSet::new(), 0).await? {
            Some(batch) => {
                let span = batch_span(&batch, epoch);
                let none_failed = HashSet::new();
                let settling = self.settle_batch(batch, &none_failed);
                let (report, _) = tracing::Instrument::instrument(settling, span).await?;
                Ok(report)
            }
            None => Ok(BatchReport::default()),
        }
    }

    /// Opens the claim transaction (fence check, claim) and enqueues the batch, withholding events of keys
    /// parked by batches still in flight. `None` when nothing is due.
    async fn claim_and_send(
        &self,
        epoch: Option<i64>,
        parked_before: &HashSet<TopicKey>,
        after: i64,
    ) -> Result<Option<InFlight>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(epoch) = epoch {
            self.store
                .check_fence(&mut tx, &self.cfg.fence_scope, epoch)
                .await?;
        }
        let batch = self
            .store
            .claim(&mut tx, self.cfg.batch_size, after)
            .await?;
        if batch.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let poison = self.cfg.retry.poison;
        let slots =
            decide::prepare_after(&batch, self.cfg.max_message_bytes, poison, parked_before);
        let parked = decide::parked_keys(&batch, &slots, poison);
        let deliveries = self.producer.enqueue_all(&batch, slots).await;
        Ok(Some(InFlight {
            tx,
            batch,
            deliveries,
            parked,
        }))
    }

    /// Awaits a batch's deliveries, settles every event in its claim transaction and commits. Returns the
    /// report and the keys whose delivery failed.
    async fn settle_batch(
        &self,
        in_flight: InFlight,
        failed_before: &HashSet<TopicKey>,
    ) -> Result<(BatchReport, HashSet<TopicKey>), StoreError> {
        let acked = self.acknowledged(in_flight).await?;
        let settle_plan = self.settle_plan(&acked, failed_before);
        self.commit_settle(acked, settle_plan).await
    }

    /// Waits for every delivery outcome of a batch in flight, at most the producer's deadline.
    async fn acknowledged(&self, in_flight: InFlight) -> Result<Acknowledged, StoreError> {
        let InFlight {
            tx,
            batch,
            deliveries,
            parked,
        } = in_flight;
        let deadline = self.producer.delivery_deadline();
        let outcomes = tokio::time::timeout(deadline, deliveries)
            .await
            .map_err(|_| StoreError::ProducerStuck(deadline))?
            .expect("delivery collector panicked");
        Ok(Acknowledged {
            tx,
            batch,
            outcomes,
            parked,
        })
    }

    /// What happens to each event of an acknowledged batch (pure; see [`decide::settle_after`]).
    fn settle_plan(
        &self,
        acked: &Acknowledged,
        failed_before: &HashSet<TopicKey>,
    ) -> decide::SettlePlan {
        let deliveries: Vec<_> = acked.outcomes.iter().map(|(d, _)| d.clone()).collect();
        decide::settle_after(
            &acked.batch,
            &deliveries,
            &self.cfg.retry,
            rand::random::<f64>,
            failed_before,
        )
    }

    /// Records the outcomes, writes the settle plan in the batch's claim transaction and commits. Returns
    /// the report and the keys whose delivery failed.
    async fn commit_settle(
        &self,
        acked: Acknowledged,
        settle_plan: decide::SettlePlan,
    ) -> Result<(BatchReport, HashSet<TopicKey>), StoreError> {
        let Acknowledged {
            mut tx,
            batch,
            outcomes,
            ..
        } = acked;
        let mut report = BatchReport {
            claimed: batch.len(),
            ..Default::default()
        };
        for (ev, (delivery, at)) in batch.iter().zip(&outcomes) {
            match delivery {
                decide::Delivery::Acked { .. } => {
                    let secs =
                        (*at - ev.created_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    self.metrics.commit_to_ack_seconds.observe(secs);
                    if let Some(observe) = &self.ack_observer {
                        observe(secs);
                    }
                }
                decide::Delivery::Failed { code, .. } => {
                    self.metrics
                        .failures
                        .get_or_create(&Reason::of(code.clone()))
                        .inc();
                }
                decide::Delivery::Withheld => {}
            }
        }
        for action in &settle_plan.actions {
            match action {
                Settle::Delivered { .. } => report.delivered += 1,
                Settle::Retry { .. } => report.retried += 1,
                Settle::Dead {
                    id, reason, error, ..
                } => {
                    report.dead += 1;
                    let ev = batch
                        .iter()
                        .find(|e| e.id == *id)
                        .expect("dead event is in the batch");
                    tracing::warn!(event_id = %ev.event_id, topic = %ev.topic, key = %ev.key, reason = reason.as_str(), "dead-lettered: {error}");
                    if self.cfg.dlq {
                        if let Err(e) = self.producer.send_dlq(ev, *reason, error).await {
                            tracing::warn!(event_id = %ev.event_id, "DLQ publish failed (the dead row is kept): {e}");
                        } else {
                            self.metrics.dlq_published.inc();
                        }
                    }
                }
            }
        }
        self.store
            .settle(&mut tx, &settle_plan.actions, self.cfg.retention)
            .await?;
        tx.commit().await?;
        self.metrics.published.inc_by(report.delivered as u64);
        self.metrics.retries.inc_by(report.retried as u64);
        for action in &settle_plan.actions {
            if let Settle::Dead { reason, .. } = action {
                self.metrics
                    .dead
                    .get_or_create(&Reason::of(reason.as_str()))
                    .inc();
            }
        }
        if settle_plan.order_violations > 0 {
            tracing::error!(
                count = settle_plan.order_violations,
                "events acknowledged after an earlier event of their key failed"
            );
            self.metrics
                .order_violations
                .inc_by(settle_plan.order_violations as u64);
        }
        Ok((report, settle_plan.failed_keys))
    }

    /// Starts the background monitors: database and broker probes (readiness) and backlog gauges.
    pub fn spawn_monitors(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last_backlog = Instant::now() - Duration::from_secs(60);
            while !shutdown.is_cancelled() {
                let db_up = process_kit::service::database_answers(&me.pool).await;
                me.health.set_database(db_up);
                me.metrics.database_up.set(db_up as i64);
                let broker_up = me.producer.probe(Duration::from_secs(2)).await.is_ok();
                me.health.set_broker(broker_up);
                me.metrics.broker_up.set(broker_up as i64);
                if db_up && last_backlog.elapsed() >= Duration::from_secs(2) {
                    if let Ok(b) = me.store.backlog(&me.pool).await {
                        me.metrics.set_backlog(&b);
                    }
                    last_backlog = Instant::now();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }
}

/// One span per non-empty batch (an empty poll exports nothing), linked to the trace of every event it
/// carries: a batch serves many traces, so it is their link, not their child.
fn batch_span(batch: &InFlight, epoch: Option<i64>) -> tracing::Span {
    let span = tracing::info_span!(
        "relay.batch",
        events = batch.batch.len(),
        epoch,
        trace_id = tracing::field::Empty
    );
    for ev in &batch.batch {
        if let Some(sc) = ev.headers["traceparent"]
            .as_str()
            .and_then(outbox::parse_traceparent)
        {
            tracing_opentelemetry::OpenTelemetrySpanExt::add_link(&span, sc);
        }
    }
    process_kit::trace_id::record_trace_id(&span);
    span
}

/// Waits for a NOTIFY (draining any others already buffered). `false` when the listener is gone;
/// never resolves when there is none, so the poll interval decides.
async fn next_notification(listener: &mut Option<PgListener>) -> bool {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    match l.recv().await {
        Ok(_) => {
            while l.next_buffered().is_some() {}
            true
        }
        Err(_) => false,
    }
}

fn is_missing_partition(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23514")
}

/// Waits until a broker answers, like [`process_kit::service::wait_for_database`].
pub async fn wait_for_broker(producer: &Producer, shutdown: &CancellationToken) -> bool {
    process_kit::service::retry_until("kafka", shutdown, || producer.probe(Duration::from_secs(3)))
        .await
}
