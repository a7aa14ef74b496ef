//! The runtime's database side: runs of a partition's records in one transaction (inbox rows, then the
//! handler for each new event), the replay one event per transaction after a failure (the same
//! transaction path with a run of one), and the decision (retry, DLQ) for each event.

use super::*;

impl<H: Handler> Runtime<H> {
    /// Runs the handler in a span that continues the event's trace (its `traceparent` header, written by
    /// the producing transaction and forwarded by the relay), so one trace runs request → commit → publish
    /// → handler when traces are exported.
    pub(super) async fn handle_in_span(
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

    /// Splits a batch into runs per partition and processes the runs concurrently. Returns the
    /// partitions that were paused and rewound.
    pub(super) async fn process_batch(
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
        // A run cut short at a gap ends with fetching again (see `continuity::on_gap`): from the expected
        // offset, then from further back, then — unless gaps are accepted — the partition stops there and
        // fetches again every GAP_REFETCH.
        let mut refetch: HashMap<Slot, Refetch> = HashMap::new();
        for (slot, run) in runs.iter_mut() {
            let offsets: Vec<i64> = run.iter().map(|m| m.offset()).collect();
            let continuity =
                crate::continuity::check(positions.expected.get(slot).copied(), &offsets);
            let crate::continuity::Continuity::GapAt {
                index,
                expected,
                found,
            } = continuity
            else {
                if !run.is_empty() {
                    positions.refetched.remove(slot);
                    if positions.stalled.remove(slot) {
                        tracing::info!(topic = %slot.0, partition = slot.1, "the missing offsets arrived; the partition goes on");
                    }
                }
                continue;
            };
            self.metrics.offset_gaps.inc();
            let (topic, partition) = (&slot.0, slot.1);
            let missing = format!("{expected}..={}", found - 1);
            let sightings = match positions.refetched.get(slot) {
                Some((at, n)) if *at == expected => n + 1,
                _ => 1,
            };
            positions
                .refetched
                .insert(slot.clone(), (expected, sightings));
            use crate::continuity::GapAction;
            match crate::continuity::on_gap(expected, sightings, self.cfg.accept_offset_gaps) {
                GapAction::Refetch { from } => {
                    tracing::warn!(
                        topic,
                        partition,
                        missing,
                        sightings,
                        from,
                        "the broker skipped offsets; fetching again"
                    );
                    run.truncate(index);
                    refetch.insert(slot.clone(), (from, Duration::ZERO, expected));
                }
                GapAction::Accept => tracing::warn!(
                    topic,
                    partition,
                    missing,
                    "offsets missing again after fetching them once more; accepting the gap (--accept-offset-gaps)"
                ),
                GapAction::Stop { from } => {
                    tracing::error!(
                        topic,
                        partition,
                        missing,
                        "offsets still missing after fetching them again from further back: on a relay topic that is loss; the partition stops here (set --accept-offset-gaps only for compacted or transactional topics)"
                    );
                    positions.stalled.insert(slot.clone());
                    run.truncate(index);
                    refetch.insert(slot.clone(), (from, GAP_REFETCH, expected));
                }
            }
        }
        self.metrics
            .partitions_stopped_at_gap
            .set(positions.stalled.len() as i64);
        self.health
            .set_stopped_at_gap(!positions.stalled.is_empty());
        let jobs: Vec<_> = runs
            .into_iter()
            .map(|(slot, run)| {
                let prior = retry.get(&slot).copied();
                let refetch_from = refetch.get(&slot).copied();
                async move {
                    let mut rewind = self.process_run(consumer, &slot, &run, prior).await;
                    let mut next = None;
                    if let (None, Some((from, delay, expected))) = (&rewind, refetch_from) {
                        rewind = Some(self.rewind(consumer, &slot, from, delay, None));
                        // Still expected there: a refetch from further back is a re-read, not a gap.
                        next = Some(expected);
                    }
                    let next = next.or(match &rewind {
                        Some(r) => Some(r.offset),
                        None => run.last().map(|m| m.offset() + 1),
                    });
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
    /// Every log line inside says which group, partition and offsets it is about.
    #[tracing::instrument(
        name = "consumer.run",
        skip_all,
        fields(
            group = %self.cfg.group_id,
            topic = %slot.0,
            partition = slot.1,
            first_offset = run.first().map(|m| m.offset()),
            records = run.len(),
        )
    )]
    pub(super) async fn process_run(
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
    pub(super) fn database_error(
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

    /// One transaction for a run (one record or more): one inbox statement, then the handler for each new
    /// event. On a handler failure everything is rolled back and the failed event's index and error
    /// returned.
    pub(super) async fn attempt_run(
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
    pub(super) fn committed(&self, starts: &[Instant], total: usize) {
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
    pub(super) async fn process_one(
        &self,
        consumer: &KafkaConsumer,
        m: &BorrowedMessage<'_>,
        attempt: u32,
    ) -> Option<Rewind> {
        let next = match decode(m) {
            Err(undecodable) => Next::DeadLetter(undecodable.to_string()),
            Ok(msg) => {
                let slot = (m.topic().to_owned(), m.partition());
                match self.attempt_run(&slot, std::slice::from_ref(&msg)).await {
                    // Handled and committed, or a duplicate the inbox skipped.
                    Ok(None) => self.decide(&msg, Ok(()), attempt),
                    Ok(Some((_, error))) => self.decide(&msg, Err(error), attempt),
                    Err(e) => return Some(self.database_error(consumer, &slot, m.offset(), &e)),
                }
            }
        };
        self.conclude(consumer, m, next, attempt).await
    }

    /// What follows attempt number `attempt` at `msg`.
    pub(super) fn decide(
        &self,
        msg: &Message,
        result: Result<(), HandlerError>,
        attempt: u32,
    ) -> Next {
        let next = decide::after_attempt(&result, attempt, &self.cfg.retry, rand::random::<f64>());
        if let (Err(e), Next::RetryAfter(d)) = (&result, &next) {
            self.metrics.retries.inc();
            tracing::warn!(event_id = %msg.event_id, attempt, "handler failed ({e}); retrying in {d:?}");
        }
        next
    }

    /// Carries out `next` for record `m`: store its offset, rewind for a retry, or dead-letter it.
    pub(super) async fn conclude(
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
                // The dead-lettering joins the inbox, so a later copy of the event (a relay duplicate, a
                // replay) is skipped instead of running the handler after later events of its key. Until
                // that row is written the record is not done: a retry may copy it to the DLQ again.
                if let Ok(msg) = decode(m) {
                    if let Err(e) = self
                        .inbox
                        .record_dead(&self.pool, &self.cfg.group_id, &msg)
                        .await
                    {
                        return Some(self.database_error(consumer, &slot, offset, &e));
                    }
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
}
