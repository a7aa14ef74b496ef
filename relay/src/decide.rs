//! Pure decisions of the relay loop: what to send from a claimed batch, and how to settle each event
//! once the deliveries are known. No IO here, so every rule is unit-tested directly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::event::ClaimedEvent;

/// What happens to later events of a key whose event was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoisonPolicy {
    /// The key waits until its dead event is redriven (order over liveness). Default.
    ParkKey,
    /// Later events of the key continue.
    Skip,
}

/// Why an event went to `outbox.dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// Record larger than the producer or broker accepts.
    TooLarge,
    /// Topic name Kafka can never accept.
    InvalidTopic,
    /// Another error the broker will answer the same way every time.
    Rejected,
    /// Retriable errors until `max_attempts` ran out.
    MaxAttempts,
}

impl DeadReason {
    /// Stable label used in `outbox.dead.reason`, metrics and DLQ headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::InvalidTopic => "invalid_topic",
            Self::Rejected => "rejected",
            Self::MaxAttempts => "max_attempts",
        }
    }
}

/// The result of producing one event, as the settle step needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged by the broker (acks=all).
    Acked {
        /// Partition written to.
        partition: i32,
        /// Offset of the record.
        offset: i64,
    },
    /// Failed; `fault` says whose fault it was.
    Failed {
        /// Error text from the client or broker.
        error: String,
        /// Short label for metrics (librdkafka error code name, or the dead reason).
        code: String,
        /// Whose fault: the broker's (no attempt counted), the record's, or permanent.
        fault: Fault,
    },
    /// Not sent: an earlier event of its key was dead-lettered under `park-key` in this batch.
    Withheld,
}

/// Whose fault a failed delivery is, which decides whether it counts toward `--max-attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker's or the network's (timeouts, transport, no leader, not enough replicas, throttling,
    /// purged or dropped by the client): not the record's fault, so no attempt is counted, and the loop
    /// stops claiming until the broker answers again. A ten-minute broker maintenance dead-letters nothing.
    Broker,
    /// The producer's own state: the broker fenced its epoch or lost its sequence, or librdkafka raised a
    /// fatal error. Every later record of this producer fails the same way, so no attempt is counted and
    /// the batches in flight roll back; the process exits and a fresh producer publishes them.
    Producer,
    /// The record's own and possibly transient (e.g. its topic does not exist yet): counts an attempt.
    Record,
    /// The record's own and certain to repeat: dead-lettered at once.
    Permanent(DeadReason),
}

/// Retry and poison settings that the settle plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before an event is dead-lettered (the first send counts).
    pub max_attempts: i32,
    /// Backoff before the second attempt; doubles per attempt.
    pub backoff_base: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
    /// Key handling after a dead letter.
    pub poison: PoisonPolicy,
}

/// Where a claim starts and what the relay has in hand, for the claim's head-of-key check: a row in
/// hand (in flight, or acknowledged and committing) holds its key back, so a later batch never carries a
/// key whose earlier record may still fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Claim only ids above this (0: from the start). Pending rows at or below it hold their keys back:
    /// those in hand, and those committed late, redriven or unparked, until a claim from the start.
    pub after: i64,
    /// Ids in hand when the claim starts at or below them (a claim from the start while batches are in
    /// flight); empty otherwise, since `after` then covers them.
    pub in_flight: Vec<i64>,
}

impl Claim {
    /// A claim from the start with nothing in hand.
    pub fn from_start() -> Self {
        Self::default()
    }
}

/// A pending row as the claim sees it: the model of `outbox.events` that [`claimable`] decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    /// Row id (commit order within a key).
    pub id: i64,
    /// Topic and key.
    pub key: TopicKey,
    /// `next_attempt_at <= now()`.
    pub due: bool,
    /// Locked by another transaction (a batch in flight): `SKIP LOCKED` passes over it.
    pub locked: bool,
}

/// How far a claim looks: the next `limit` x this many due rows not in hand whose keys do not wait for
/// long (parked, or with a row in backoff). A bound on the claim's work when most keys are held
/// back by rows in flight (hot keys), at the price of a short claim when the claimable rows lie further
/// on; those holds end within a batch's round trip, and the rows behind them are claimed then.
pub const CLAIM_SCAN_FACTOR: i64 = 2;

/// The claim rule that `Store::claim`'s SQL implements, as a pure function over committed pending rows
/// (ascending ids) and the parked keys: an event is claimed only when every earlier pending row of its
/// key is in the same claim. An earlier row holds the key back when it is at or below `claim.after` or in
/// `claim.in_flight`; a key that is parked or has a row in backoff waits whole. Of the due rows above
/// `claim.after`, not in `claim.in_flight`, whose keys do not wait, the next `limit` x
/// [`CLAIM_SCAN_FACTOR`] are looked at; of those, the first `limit` not locked by another transaction
/// (`SKIP LOCKED`) whose keys nothing else holds back are claimed. The relay runs the SQL; the model tests
/// run this, and a differential test holds the two together on random tables.
pub fn claimable(
    rows: &[PendingRow],
    claim: &Claim,
    limit: usize,
    parked: &HashSet<TopicKey>,
) -> Vec<i64> {
    let earlier = |e: &PendingRow, held: &dyn Fn(&PendingRow) -> bool| {
        rows.iter()
            .any(|p| p.key == e.key && p.id < e.id && held(p))
    };
    let in_flight = |p: &PendingRow| p.id <= claim.after || claim.in_flight.contains(&p.id);
    let scan = limit.saturating_mul(CLAIM_SCAN_FACTOR as usize);
    rows.iter()
        .filter(|e| e.due && e.id > claim.after && !claim.in_flight.contains(&e.id))
        .filter(|e| !parked.contains(&e.key) && !rows.iter().any(|p| p.key == e.key && !p.due))
        .take(scan)
        .filter(|e| !earlier(e, &in_flight))
        .filter(|e| !e.locked)
        .take(limit)
        .map(|e| e.id)
        .collect()
}

/// Checks that make an event impossible to produce, found before sending so it cannot leave a gap behind
/// later events of its key. `max_message_bytes` is the producer's `message.max.bytes`.
pub fn precheck(ev: &ClaimedEvent, max_message_bytes: usize) -> Option<(DeadReason, String)> {
    if let Err(e) = outbox::validate::topic(&ev.topic) {
        return Some((DeadReason::InvalidTopic, e.to_string()));
    }
    let size = ev.record_size_estimate();
    if size > max_message_bytes {
        return Some((
            DeadReason::TooLarge,
            format!("record of about {size} bytes exceeds message.max.bytes={max_message_bytes}"),
        ));
    }
    None
}

/// A record key within its topic: the unit of ordering.
pub type TopicKey = (String, String);

fn topic_key(ev: &ClaimedEvent) -> TopicKey {
    (ev.topic.clone(), ev.key.clone())
}

/// Splits a claimed batch (in id order) into events to send and events settled without sending:
/// `Failed{permanent}` for prechecked ones, `Withheld` for later events of a key parked in this batch.
/// Returns one slot per event: `None` means "send it".
pub fn prepare(
    batch: &[ClaimedEvent],
    max_message_bytes: usize,
    poison: PoisonPolicy,
) -> Vec<Option<Delivery>> {
    prepare_after(batch, max_message_bytes, poison, &HashSet::new())
}

/// [`prepare`] for a batch claimed while earlier batches are still in flight: keys those batches park
/// (`parked_before`, not yet committed to `outbox.dead`, so the claim could not skip them) are withheld
/// here too.
pub fn prepare_after(
    batch: &[ClaimedEvent],
    max_message_bytes: usize,
    poison: PoisonPolicy,
    parked_before: &HashSet<TopicKey>,
) -> Vec<Option<Delivery>> {
    let mut parked: HashSet<TopicKey> = HashSet::new();
    batch
        .iter()
        .map(|ev| {
            let key = topic_key(ev);
            if parked.contains(&key) || parked_before.contains(&key) {
                return Some(Delivery::Withheld);
            }
            let (reason, error) = precheck(ev, max_message_bytes)?;
            if poison == PoisonPolicy::ParkKey {
                parked.insert(key);
            }
            Some(Delivery::Failed {
                error,
                code: reason.as_str().into(),
                fault: Fault::Permanent(reason),
            })
        })
        .collect()
}

/// Keys a prepared batch parks: those of its prechecked failures (under park-key) and of its withheld
/// events. A batch claimed after it, while it is in flight, must withhold them as well.
pub fn parked_keys(
    batch: &[ClaimedEvent],
    slots: &[Option<Delivery>],
    poison: PoisonPolicy,
) -> HashSet<TopicKey> {
    batch
        .iter()
        .zip(slots)
        .filter(|(_, slot)| match slot {
            Some(Delivery::Withheld) => true,
            Some(Delivery::Failed { .. }) => poison == PoisonPolicy::ParkKey,
            _ => false,
        })
        .map(|(ev, _)| topic_key(ev))
        .collect()
}

/// Exponential backoff with "equal jitter": half fixed, half random, so retries of many events spread
/// out but never come back sooner than half the nominal delay. `unit` is a random number in [0, 1).
pub fn backoff(attempts_so_far: i32, policy: &RetryPolicy, unit: f64) -> Duration {
    let retry = attempts_so_far.max(0) as u32 + 1;
    let nominal = process_kit::backoff::exponential(policy.backoff_base, policy.backoff_max, retry);
    process_kit::backoff::equal_jitter(nominal, unit)
}

/// How the settle transaction treats one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Remove from `events` (delete or archive).
    Delivered {
        /// Event row id.
        id: i64,
        /// Partition written to.
        partition: i32,
        /// Offset written at.
        offset: i64,
    },
    /// Keep pending: attempts+1 when `counts`, next attempt after `delay`.
    Retry {
        /// Event row id.
        id: i64,
        /// Backoff before the next attempt.
        delay: Duration,
        /// Error recorded in `last_error`.
        error: String,
        /// Whether the failure counts toward `max_attempts` (the record's fault, not the broker's).
        counts: bool,
    },
    /// Move to `outbox.dead`.
    Dead {
        /// Event row id.
        id: i64,
        /// Why.
        reason: DeadReason,
        /// Error text.
        error: String,
        /// Whether later events of the key wait (park-key).
        parked: bool,
    },
}

/// The settle plan for a batch plus what the loop reports about it.
#[derive(Debug, Default, PartialEq)]
pub struct SettlePlan {
    /// One entry per event that changes state (withheld events stay untouched).
    pub actions: Vec<Settle>,
    /// Events acknowledged while an earlier event of the same key that failed is still pending (in this
    /// batch or in an earlier one settled while this one was in flight): their key's order is broken. The
    /// claim rule and the idempotent producer should make this impossible; it is counted, not hidden.
    pub order_violations: usize,
    /// Keys with a failed delivery in this batch.
    pub failed_keys: HashSet<TopicKey>,
    /// The failed heads after this batch: `failed_before` with this batch's retried events added and the
    /// heads it delivered (a retry that got through) removed.
    pub failed_heads: FailedHeads,
    /// Deliveries that failed through the broker's or the network's fault: the loop stops claiming
    /// until the broker answers.
    pub broker_faults: usize,
    /// Deliveries that failed through the producer's own state ([`Fault::Producer`]): settled like the
    /// broker's; the loop ends the process when they repeat batch after batch.
    pub producer_faults: usize,
}

/// Per key, the lowest id whose delivery failed and that is pending again (in backoff), since the
/// pipeline was last empty. An acknowledgment of a higher id of the key is an order violation; one of that
/// id itself is its retry getting through.
pub type FailedHeads = HashMap<TopicKey, i64>;

/// Decides the settle action of every event from its delivery. `deliveries[i]` belongs to `batch[i]`;
/// `jitter` yields numbers in [0, 1).
pub fn settle(
    batch: &[ClaimedEvent],
    deliveries: &[Delivery],
    policy: &RetryPolicy,
    jitter: impl FnMut() -> f64,
) -> SettlePlan {
    settle_after(batch, deliveries, policy, jitter, &FailedHeads::new())
}

/// [`settle`] for a batch that was in flight with earlier ones: `failed_before` holds the heads whose
/// delivery failed in those batches (an acknowledgment of a later event of such a key is an order
/// violation as well).
pub fn settle_after(
    batch: &[ClaimedEvent],
    deliveries: &[Delivery],
    policy: &RetryPolicy,
    mut jitter: impl FnMut() -> f64,
    failed_before: &FailedHeads,
) -> SettlePlan {
    debug_assert_eq!(batch.len(), deliveries.len());
    let mut plan = SettlePlan {
        failed_heads: failed_before.clone(),
        ..SettlePlan::default()
    };
    for (ev, delivery) in batch.iter().zip(deliveries) {
        let key = topic_key(ev);
        match delivery {
            Delivery::Acked { partition, offset } => {
                match plan.failed_heads.get(&key) {
                    Some(head) if *head < ev.id => plan.order_violations += 1,
                    Some(head) if *head == ev.id => drop(plan.failed_heads.remove(&key)),
                    _ => {}
                }
                plan.actions.push(Settle::Delivered {
                    id: ev.id,
                    partition: *partition,
                    offset: *offset,
                });
            }
            Delivery::Withheld => {}
            Delivery::Failed { error, fault, .. } => {
                plan.failed_keys.insert(key.clone());
                let dead = match fault {
                    Fault::Permanent(reason) => Some(*reason),
                    Fault::Record => {
                        (ev.attempts + 1 >= policy.max_attempts).then_some(DeadReason::MaxAttempts)
                    }
                    Fault::Broker | Fault::Producer => None,
                };
                match fault {
                    Fault::Broker => plan.broker_faults += 1,
                    Fault::Producer => plan.producer_faults += 1,
                    _ => {}
                }
                if dead.is_none() {
                    // Pending again: later events of its key must not be acknowledged before it.
                    let head = plan.failed_heads.entry(key.clone()).or_insert(ev.id);
                    *head = (*head).min(ev.id);
                }
                plan.actions.push(match dead {
                    Some(reason) => Settle::Dead {
                        id: ev.id,
                        reason,
                        error: error.clone(),
                        parked: policy.poison == PoisonPolicy::ParkKey,
                    },
                    // A broker fault backs off as a first retry does: the loop's wait for the broker,
                    // not a growing per-event delay, paces an outage.
                    None => Settle::Retry {
                        id: ev.id,
                        delay: match fault {
                            Fault::Broker | Fault::Producer => backoff(0, policy, jitter()),
                            _ => backoff(ev.attempts, policy, jitter()),
                        },
                        error: error.clone(),
                        counts: *fault == Fault::Record,
                    },
                });
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, key: &str, payload_len: usize) -> ClaimedEvent {
        ClaimedEvent::for_test(id, "orders", key, vec![b'x'; payload_len])
    }

    fn policy(poison: PoisonPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            poison,
        }
    }

    #[test]
    fn oversized_event_parks_its_key_only() {
        let batch = vec![
            ev(1, "a", 10),
            ev(2, "b", 2000),
            ev(3, "b", 10),
            ev(4, "a", 10),
        ];
        let slots = prepare(&batch, 1000, PoisonPolicy::ParkKey);
        assert_eq!(slots[0], None);
        assert!(matches!(
            slots[1],
            Some(Delivery::Failed {
                fault: Fault::Permanent(DeadReason::TooLarge),
                ..
            })
        ));
        assert_eq!(slots[2], Some(Delivery::Withheld));
        assert_eq!(slots[3], None);
    }

    #[test]
    fn skip_policy_lets_the_key_continue() {
        let batch = vec![ev(1, "b", 2000), ev(2, "b", 10)];
        let slots = prepare(&batch, 1000, PoisonPolicy::Skip);
        assert!(slots[0].is_some());
        assert_eq!(slots[1], None);
    }

    #[test]
    fn invalid_topic_is_caught_before_sending() {
        let mut bad = ev(1, "a", 1);
        bad.topic = "no spaces".into();
        let slots = prepare(&[bad], 1000, PoisonPolicy::ParkKey);
        assert!(
            matches!(&slots[0], Some(Delivery::Failed { fault: Fault::Permanent(DeadReason::InvalidTopic), error, .. }) if error.contains("illegal character"))
        );
    }

    #[test]
    fn backoff_grows_and_is_capped_with_jitter_bounds() {
        let p = policy(PoisonPolicy::ParkKey);
        assert_eq!(backoff(0, &p, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(0, &p, 0.999_999).as_millis(), 99);
        assert_eq!(backoff(3, &p, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(30, &p, 0.0), Duration::from_secs(5));
        assert!(backoff(30, &p, 0.99) <= Duration::from_secs(10));
    }

    #[test]
    fn settle_retries_then_dead_letters_at_max_attempts() {
        let mut e1 = ev(1, "a", 1);
        let mut e2 = ev(2, "b", 1);
        e1.attempts = 0;
        e2.attempts = 2;
        let failed = Delivery::Failed {
            error: "timed out".into(),
            code: "c".into(),
            fault: Fault::Record,
        };
        let plan = settle(
            &[e1, e2],
            &[failed.clone(), failed],
            &policy(PoisonPolicy::ParkKey),
            || 0.0,
        );
        assert!(
            matches!(&plan.actions[0], Settle::Retry { id: 1, delay, .. } if *delay == Duration::from_millis(50))
        );
        assert!(matches!(
            &plan.actions[1],
            Settle::Dead {
                id: 2,
                reason: DeadReason::MaxAttempts,
                parked: true,
                ..
            }
        ));
    }

    #[test]
    fn acked_after_failure_of_same_key_is_counted_as_order_violation() {
        let batch = vec![ev(1, "a", 1), ev(2, "a", 1), ev(3, "b", 1)];
        let deliveries = vec![
            Delivery::Failed {
                error: "x".into(),
                code: "c".into(),
                fault: Fault::Record,
            },
            Delivery::Acked {
                partition: 0,
                offset: 7,
            },
            Delivery::Acked {
                partition: 1,
                offset: 8,
            },
        ];
        let plan = settle(&batch, &deliveries, &policy(PoisonPolicy::ParkKey), || 0.5);
        assert_eq!(plan.order_violations, 1);
        assert_eq!(plan.actions.len(), 3);
        assert_eq!(
            plan.actions[2],
            Settle::Delivered {
                id: 3,
                partition: 1,
                offset: 8
            }
        );
    }

    #[test]
    fn withheld_events_stay_untouched_and_permanent_skip_is_not_parked() {
        let batch = vec![ev(1, "a", 1), ev(2, "a", 1)];
        let deliveries = vec![
            Delivery::Failed {
                error: "big".into(),
                code: "c".into(),
                fault: Fault::Permanent(DeadReason::TooLarge),
            },
            Delivery::Withheld,
        ];
        let plan = settle(&batch, &deliveries, &policy(PoisonPolicy::Skip), || 0.0);
        assert_eq!(plan.actions.len(), 1);
        assert!(matches!(
            plan.actions[0],
            Settle::Dead {
                parked: false,
                reason: DeadReason::TooLarge,
                ..
            }
        ));
    }

    fn key(k: &str) -> TopicKey {
        ("orders".into(), k.into())
    }

    #[test]
    fn a_key_parked_by_a_batch_in_flight_is_withheld_from_the_next_batch() {
        let first = vec![ev(1, "a", 10), ev(2, "b", 2000), ev(3, "b", 10)];
        let slots = prepare(&first, 1000, PoisonPolicy::ParkKey);
        let parked = parked_keys(&first, &slots, PoisonPolicy::ParkKey);
        assert_eq!(parked, HashSet::from([key("b")]));

        let next = vec![
            ev(4, "b", 10),
            ev(5, "a", 10),
            ev(6, "c", 2000),
            ev(7, "c", 10),
        ];
        let slots = prepare_after(&next, 1000, PoisonPolicy::ParkKey, &parked);
        assert_eq!(
            slots[0],
            Some(Delivery::Withheld),
            "b waits for its dead head"
        );
        assert_eq!(slots[1], None, "a goes on");
        assert!(matches!(slots[2], Some(Delivery::Failed { .. })));
        assert_eq!(slots[3], Some(Delivery::Withheld));
        assert_eq!(
            parked_keys(&next, &slots, PoisonPolicy::ParkKey),
            HashSet::from([key("b"), key("c")])
        );
    }

    #[test]
    fn under_skip_nothing_is_parked_across_batches() {
        let first = vec![ev(1, "b", 2000), ev(2, "b", 10)];
        let slots = prepare(&first, 1000, PoisonPolicy::Skip);
        assert_eq!(slots[1], None);
        assert!(parked_keys(&first, &slots, PoisonPolicy::Skip).is_empty());
    }

    #[test]
    fn an_ack_after_a_failure_of_its_key_in_an_earlier_batch_is_an_order_violation() {
        let earlier = vec![ev(1, "a", 1), ev(2, "b", 1)];
        let failed = Delivery::Failed {
            error: "timed out".into(),
            code: "MessageTimedOut".into(),
            fault: Fault::Record,
        };
        let acked = Delivery::Acked {
            partition: 0,
            offset: 1,
        };
        let first = settle(
            &earlier,
            &[failed.clone(), acked.clone()],
            &policy(PoisonPolicy::ParkKey),
            || 0.0,
        );
        assert_eq!(first.failed_keys, HashSet::from([key("a")]));
        assert_eq!(first.failed_heads, FailedHeads::from([(key("a"), 1)]));
        assert_eq!(first.order_violations, 0);

        let later = vec![ev(3, "a", 1), ev(4, "b", 1)];
        let second = settle_after(
            &later,
            &[acked.clone(), acked],
            &policy(PoisonPolicy::ParkKey),
            || 0.0,
            &first.failed_heads,
        );
        assert_eq!(
            second.order_violations, 1,
            "a's later event overtook its failed head"
        );
        assert!(second.failed_keys.is_empty());
        // The retry of the failed head itself getting through is no violation, and clears the head.
        let retry = settle_after(
            &[ev(1, "a", 1)],
            &[Delivery::Acked {
                partition: 0,
                offset: 2,
            }],
            &policy(PoisonPolicy::ParkKey),
            || 0.0,
            &first.failed_heads,
        );
        assert_eq!(retry.order_violations, 0);
        assert!(retry.failed_heads.is_empty());
    }
}
