//! The runtime's Kafka side: the client and its callbacks (statistics, errors, rebalances), the group
//! membership checks that decide when to replace the client, stored offsets, and pause-and-rewind.

use super::*;

/// librdkafka callbacks: commit before partitions move; readiness, lag and the group membership's
/// progress from statistics.
pub(super) struct Callbacks {
    pub(super) group: String,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) membership: Mutex<MembershipWatch>,
    /// Rebalances seen (the loop forgets its expected offsets when this moves).
    pub(super) rebalances: std::sync::atomic::AtomicU64,
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

pub(super) fn commit_stored<C: ConsumerContext, T: Consumer<C>>(consumer: &T) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!("offset commit failed: {e}"),
    }
}

impl<H: Handler> Runtime<H> {
    pub(super) fn consumer(&self) -> Result<KafkaConsumer, KafkaError> {
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

    /// Whether the client's group membership is stuck: unsettled past the rejoin timeout, or settled
    /// without partitions past it although the group's size says this member should own some.
    pub(super) fn membership_stalled(&self, consumer: &KafkaConsumer) -> bool {
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
    pub(super) fn group_progress(&self, consumer: &KafkaConsumer) -> Option<Progress> {
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

    /// Marks everything up to and including `offset` as done; librdkafka commits it shortly after.
    pub(super) fn store_offset(&self, consumer: &KafkaConsumer, slot: &Slot, offset: i64) {
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
    pub(super) fn rewind(
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
}
