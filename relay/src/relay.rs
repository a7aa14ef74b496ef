//! The claim → produce → settle loop, and the monitors that feed health and metrics.

use std::collections::HashSet;
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
use crate::pipeline::{Abort, Acknowledged, InFlight, Pipeline};
use crate::producer::{dlq_topic, Producer};
use crate::retention;
use crate::store::{Claim, Retention, Store};

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
    /// Wakes the DLQ forwarder when a batch committed dead rows.
    dead_committed: tokio::sync::Notify,
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

/// Settles in a row with deliveries failed through the producer's own state after which the process
/// ends, so a fresh producer publishes: one such settle is librdkafka recovering (an epoch bumped after a
/// timeout); a broker that fenced the producer for good (seen with tansu after an outage) fails every one.
const PRODUCER_FAULT_STREAK: u32 = 3;

/// What settling the oldest batch (and the claim overlapping its commit) came to.
enum Settled {
    /// Settled and committed; `broker_faults` deliveries failed through the broker's fault, with
    /// `codes` (the distinct error codes, for the log line).
    Committed {
        broker_faults: usize,
        /// Deliveries that failed through the producer's own state (settled like the broker's).
        producer_faults: usize,
        codes: Vec<String>,
    },
    /// The step failed: roll everything in flight back.
    Aborted(Abort),
}

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
            dead_committed: tokio::sync::Notify::new(),
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
    /// While it leads, the DLQ forwarder sends the copies of dead rows. On shutdown the batches in flight
    /// are finished before returning. Fails (after rolling back and releasing the leadership) when the
    /// Kafka producer is stuck or failed fatally ([`Abort::ends_process`]).
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
            let forwarding = CancellationToken::new();
            let publishing = async {
                let r = self.publish_while(&leadership, &shutdown).await;
                forwarding.cancel();
                r
            };
            let (published, ()) = tokio::join!(publishing, self.forward_dlq(&forwarding));
            self.metrics.in_flight_batches.set(0);
            self.metrics.claiming_paused.set(0);
            self.metrics.active.set(0);
            self.health
                .set_role(Role::Standby("leadership released".into()));
            coordinator.release().await;
            // A stuck or failed producer cannot be trusted again: exit, so a fresh process (its pod
            // restarted) publishes the rolled-back batches.
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
    /// [`RelayConfig::in_flight_batches`] batches claimed and sent before the oldest settles (see
    /// [`crate::pipeline`] for the ordering rules). Losing the leadership rolls every batch in flight
    /// back at once (and frees the fence row the next holder waits for); a shutdown settles them first.
    /// After deliveries failed through the broker's fault it stops claiming until the broker answers.
    async fn publish_while(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<(), Abort> {
        let lost = &leadership.lost;
        let depth = self.cfg.in_flight_batches.max(1);
        let mut pipeline = Pipeline::default();
        let mut listener = None;
        let mut errors = 0u32;
        let mut broker_waits = 0u32;
        // Settles in a row with deliveries failed through the producer's own state.
        let mut producer_streak = 0u32;
        let mut last_maintenance = Instant::now();
        loop {
            self.metrics.in_flight_batches.set(pipeline.len() as i64);
            if lost.is_cancelled() {
                self.aborted(&mut pipeline, &Abort::Lost);
                return Ok(());
            }
            let stopping = shutdown.is_cancelled();
            if stopping && pipeline.is_empty() {
                return Ok(());
            }
            if broker_waits > 0 && pipeline.is_empty() && !stopping {
                if !self.wait_for_broker(broker_waits, lost, shutdown).await {
                    continue; // lost or shutting down: handled at the top
                }
                broker_waits = 0;
            }
            if self.cfg.notify && listener.is_none() && !stopping {
                listener = self.listen().await;
            }
            if pipeline.is_empty() && last_maintenance.elapsed() > Duration::from_secs(3600) {
                self.maintain_archive().await;
                last_maintenance = Instant::now();
            }
            // Fill the pipeline while claims come back full (more is likely waiting); not while the
            // broker is failing deliveries.
            let mut failure = None;
            // A claim that came back empty while batches are in flight found every key it looked at held
            // back by them; the overlap claim below would find the same (the settling batch still counts
            // as in hand), so it waits for the next round, which claims from the start.
            let mut came_back_empty = false;
            while !stopping && broker_waits == 0 && pipeline.len() < depth {
                let claim = pipeline.next_claim(None);
                let withheld = pipeline.withheld(None);
                match unless_lost(
                    lost,
                    self.claim_and_send(leadership.epoch, &withheld, &claim),
                )
                .await
                {
                    Guarded::Lost => break,
                    Guarded::Done(Ok(batch)) => {
                        came_back_empty = batch.is_none();
                        let more = pipeline.admit(claim.after, batch, self.cfg.batch_size);
                        self.metrics.in_flight_batches.set(pipeline.len() as i64);
                        if !more {
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
                if let Some(oldest) = pipeline.pop_oldest() {
                    let overlap = !stopping
                        && broker_waits == 0
                        && pipeline.len() < depth
                        && !came_back_empty;
                    match self
                        .settle_oldest(&mut pipeline, oldest, leadership, overlap)
                        .await
                    {
                        Guarded::Lost => continue, // aborts at the top of the loop
                        Guarded::Done(Settled::Committed {
                            broker_faults,
                            producer_faults,
                            codes,
                        }) => {
                            errors = 0;
                            producer_streak = if producer_faults > 0 {
                                producer_streak + 1
                            } else {
                                0
                            };
                            if producer_streak >= PRODUCER_FAULT_STREAK {
                                let e = Abort::ProducerFatal(format!(
                                    "deliveries failed through the producer's own state in {producer_streak} batches in a row (codes {})",
                                    codes.join(",")
                                ));
                                self.aborted(&mut pipeline, &e);
                                return Err(e);
                            }
                            let broker_faults = broker_faults + producer_faults;
                            if broker_faults > 0 {
                                broker_waits += 1;
                                self.metrics.broker_waits.inc();
                                tracing::warn!(
                                    deliveries = broker_faults,
                                    codes = codes.join(","),
                                    "deliveries failed through the broker's fault or the producer's state; no attempt counted, claiming stops until it answers"
                                );
                            }
                            continue;
                        }
                        Guarded::Done(Settled::Aborted(e)) => failure = Some(e),
                    }
                }
            }
            if lost.is_cancelled() {
                continue; // aborts at the top of the loop
            }
            let wait = match failure {
                None => self.cfg.poll_interval,
                Some(e) => {
                    self.aborted(&mut pipeline, &e);
                    match e {
                        Abort::Lost => continue,
                        Abort::Fenced(f) => {
                            tracing::error!("{f}; stopping publishing");
                            lost.cancel();
                            return Ok(());
                        }
                        Abort::Database(e) => {
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
                        e @ (Abort::ProducerStuck(_) | Abort::ProducerFatal(_)) => return Err(e),
                    }
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

    /// Acknowledges the oldest batch, then commits its settle while the next claim runs (when `overlap`:
    /// the database works on both at once); the claimed batch joins the pipeline.
    async fn settle_oldest(
        &self,
        pipeline: &mut Pipeline,
        oldest: InFlight,
        leadership: &Leadership,
        overlap: bool,
    ) -> Guarded<Settled> {
        let lost = &leadership.lost;
        let span = batch_span(&oldest, leadership.epoch);
        let acked = match unless_lost(lost, self.acknowledged(oldest)).await {
            Guarded::Lost => return Guarded::Lost,
            Guarded::Done(Ok(acked)) => acked,
            Guarded::Done(Err(e)) => return Guarded::Done(Settled::Aborted(e)),
        };
        let plan = self.settle_plan(&acked, pipeline.failed_before());
        if !plan.failed_keys.is_empty() {
            // A producer that raised a fatal error fails every later record: roll back (nothing is
            // settled) and exit, so a fresh producer publishes them. Failures of the producer's own state
            // short of that (an epoch bumped after a timeout) settle like the broker's; the loop ends the
            // process only when they repeat (`PRODUCER_FAULT_STREAK`).
            if let Some(why) = self.producer.fatal_error() {
                return Guarded::Done(Settled::Aborted(Abort::ProducerFatal(why)));
            }
        }
        // The next claim must not take a key this batch failed or parked, nor one a batch still in
        // flight parks: none of those rows is committed yet, so the claim's own exclusions cannot see them.
        let claim = pipeline.next_claim(Some(&acked));
        let withheld = pipeline.withheld(Some((&acked, &plan.failed_keys)));
        let (broker_faults, producer_faults) = (plan.broker_faults, plan.producer_faults);
        let mut codes: Vec<String> = Vec::new();
        for (d, _) in &acked.outcomes {
            if let decide::Delivery::Failed { code, .. } = d {
                if !codes.contains(code) {
                    codes.push(code.clone());
                }
            }
        }
        let settling = tracing::Instrument::instrument(self.commit_settle(acked, plan), span);
        let claiming = async {
            match overlap {
                true => Some(
                    self.claim_and_send(leadership.epoch, &withheld, &claim)
                        .await,
                ),
                false => None,
            }
        };
        let both = async { tokio::join!(settling, claiming) };
        let Guarded::Done((settled, claimed)) = unless_lost(lost, both).await else {
            return Guarded::Lost;
        };
        let mut failure = None;
        match claimed {
            Some(Ok(batch)) => {
                pipeline.admit(claim.after, batch, self.cfg.batch_size);
            }
            Some(Err(e)) => failure = Some(e),
            None => {}
        }
        match settled {
            Ok((_, failed)) => pipeline.settled(failed),
            Err(e) => failure = Some(e),
        }
        Guarded::Done(match failure {
            Some(e) => Settled::Aborted(e),
            None => Settled::Committed {
                broker_faults,
                producer_faults,
                codes,
            },
        })
    }

    /// Waits until the broker answers a metadata request, after deliveries failed through its fault; at
    /// least a backoff that grows with consecutive waits (a broker that answers metadata but refuses
    /// produce requests must not be hammered). Readiness and `claiming_paused` show the wait. `false`
    /// when the leadership was lost or shutdown began first.
    async fn wait_for_broker(
        &self,
        waits: u32,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> bool {
        self.metrics.claiming_paused.set(1);
        self.health.set_broker(false);
        let mut probes = 0;
        let answered = loop {
            let pause = process_kit::backoff::exponential(
                Duration::from_millis(200),
                Duration::from_secs(5),
                waits + probes,
            );
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = lost.cancelled() => break false,
                _ = tokio::time::sleep(pause) => {}
            }
            if self.producer.probe(Duration::from_secs(2)).await.is_ok() {
                break true;
            }
            probes += 1;
        };
        if answered {
            tracing::info!("the broker answers again; claiming resumes");
            self.health.set_broker(true);
        }
        self.metrics.claiming_paused.set(0);
        answered
    }

    /// Rolls the pipeline back; counts the batches dropped for a lost leadership, or the failure.
    fn aborted(&self, pipeline: &mut Pipeline, why: &Abort) {
        let dropped = pipeline.abort();
        let count = match why {
            Abort::Lost => {
                if dropped > 0 {
                    tracing::warn!(
                        batches = dropped,
                        "leadership lost; rolling the batches in flight back"
                    );
                }
                dropped as u64
            }
            _ => 1,
        };
        if count > 0 {
            self.metrics
                .batch_errors
                .get_or_create(&Reason::of(why.label()))
                .inc_by(count);
        }
        self.metrics.in_flight_batches.set(0);
    }

    async fn listen(&self) -> Option<PgListener> {
        let channel = outbox::notify_channel(&self.cfg.schema);
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(&channel).await.ok()?;
        Some(l)
    }

    /// One claim (from the start, nothing in flight) → produce → settle transaction. Public so tests and
    /// tools can drive it.
    pub async fn run_batch(&self, epoch: Option<i64>) -> Result<BatchReport, Abort> {
        match self
            .claim_and_send(epoch, &HashSet::new(), &Claim::from_start())
            .await?
        {
            Some(batch) => {
                let span = batch_span(&batch, epoch);
                let none_failed = decide::FailedHeads::new();
                let settling = async {
                    let acked = self.acknowledged(batch).await?;
                    let plan = self.settle_plan(&acked, &none_failed);
                    self.commit_settle(acked, plan).await
                };
                let (report, _) = tracing::Instrument::instrument(settling, span).await?;
                Ok(report)
            }
            None => Ok(BatchReport::default()),
        }
    }

    /// Opens the claim transaction (fence check, claim) and enqueues the batch, withholding events of
    /// `withheld` keys (parked or failed in batches whose rows are not committed yet). `None` when nothing
    /// is due.
    async fn claim_and_send(
        &self,
        epoch: Option<i64>,
        withheld: &HashSet<TopicKey>,
        claim: &Claim,
    ) -> Result<Option<InFlight>, Abort> {
        let mut tx = self.pool.begin().await?;
        if let Some(epoch) = epoch {
            self.store
                .check_fence(&mut tx, &self.cfg.fence_scope, epoch)
                .await?;
        }
        let batch = self
            .store
            .claim(&mut tx, self.cfg.batch_size, claim)
            .await?;
        if batch.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let poison = self.cfg.retry.poison;
        let slots = decide::prepare_after(&batch, self.cfg.max_message_bytes, poison, withheld);
        let parked = decide::parked_keys(&batch, &slots, poison);
        let deliveries = self.producer.enqueue_all(&batch, slots).await;
        Ok(Some(InFlight {
            tx,
            batch,
            deliveries,
            parked,
        }))
    }

    /// Waits for every delivery outcome of a batch in flight, at most the producer's deadline.
    async fn acknowledged(&self, in_flight: InFlight) -> Result<Acknowledged, Abort> {
        let InFlight {
            tx,
            batch,
            deliveries,
            parked,
        } = in_flight;
        let deadline = self.producer.delivery_deadline();
        let outcomes = tokio::time::timeout(deadline, deliveries)
            .await
            .map_err(|_| Abort::ProducerStuck(deadline))?
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
        failed_before: &decide::FailedHeads,
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

    /// Records the outcomes, writes the settle plan in the batch's claim transaction and commits. Dead
    /// rows commit with the batch, marked for the DLQ forwarder: nothing waits for the broker inside the
    /// claim transaction. Returns the report and the failed heads after this batch.
    async fn commit_settle(
        &self,
        acked: Acknowledged,
        settle_plan: decide::SettlePlan,
    ) -> Result<(BatchReport, decide::FailedHeads), Abort> {
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
                }
            }
        }
        self.store
            .settle(
                &mut tx,
                &settle_plan.actions,
                self.cfg.retention,
                self.cfg.dlq,
            )
            .await?;
        tx.commit().await?;
        if report.dead > 0 && self.cfg.dlq {
            self.dead_committed.notify_one();
        }
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
        Ok((report, settle_plan.failed_heads))
    }

    /// Sends the copies of dead rows to `<topic>.dlq` until `stop`, outside every claim transaction: a
    /// DLQ topic that refuses them never blocks or repeats the main flow. Only the leader forwards, so
    /// relays in standby send nothing.
    async fn forward_dlq(&self, stop: &CancellationToken) {
        if !self.cfg.dlq {
            return;
        }
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let wait = match self.send_due_dlq().await {
                Ok(0) => Duration::from_secs(5),
                Ok(_) => {
                    failures = 0;
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!("DLQ copies not all sent (the dead rows keep them due): {e}");
                    process_kit::backoff::exponential(
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                        failures,
                    )
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.dead_committed.notified(), if failures == 0 => {}
            }
        }
    }

    /// Sends the copies of up to 100 dead rows whose copy is due and marks each sent once the broker
    /// acknowledged it (a crash in between sends it again: at least once). Returns how many were sent;
    /// an error when one failed. Public so tests and tools can drive it.
    pub async fn send_due_dlq(&self) -> anyhow::Result<usize> {
        let due = self.store.dlq_due(&self.pool, 100).await?;
        let sends = due.iter().map(|d| async move {
            (
                d,
                self.producer.send_dlq(&d.event, &d.reason, &d.error).await,
            )
        });
        let mut sent = 0;
        let mut failed = None;
        for (d, result) in futures::future::join_all(sends).await {
            match result {
                Ok(()) => {
                    self.store.dlq_sent(&self.pool, d.event.id).await?;
                    self.metrics.dlq_published.inc();
                    sent += 1;
                }
                Err(e) => {
                    self.metrics.dlq_failures.inc();
                    failed = Some(format!(
                        "{} (event {}): {e}",
                        dlq_topic(&d.event.topic),
                        d.event.event_id
                    ));
                }
            }
        }
        match failed {
            Some(e) => anyhow::bail!("{e}"),
            None => Ok(sent),
        }
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
