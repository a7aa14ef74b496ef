//! Pure decisions of the relay loop: what to send from a claimed batch, and how to settle each event
//! once the deliveries are known. No IO here, so every rule is unit-tested directly.

use std::collections::HashSet;
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
    /// Failed; `permanent` is `Some` when retrying cannot help.
    Failed {
        /// Error text from the client or broker.
        error: String,
        /// Short label for metrics (librdkafka error code name, or the dead reason).
        code: String,
        /// Set for errors that will repeat forever.
        permanent: Option<DeadReason>,
    },
    /// Not sent: an earlier event of its key was dead-lettered under `park-key` in this batch.
    Withheld,
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

/// Splits a claimed batch (in id order) into events to send and events settled without sending:
/// `Failed{permanent}` for prechecked ones, `Withheld` for later events of a key parked in this batch.
/// Returns one slot per event: `None` means "send it".
pub fn prepare(
    batch: &[ClaimedEvent],
    max_message_bytes: usize,
    poison: PoisonPolicy,
) -> Vec<Option<Delivery>> {
    let mut parked: HashSet<(&str, &str)> = HashSet::new();
    batch
        .iter()
        .map(|ev| {
            if parked.contains(&(ev.topic.as_str(), ev.key.as_str())) {
                return Some(Delivery::Withheld);
            }
            let (reason, error) = precheck(ev, max_message_bytes)?;
            if poison == PoisonPolicy::ParkKey {
                parked.insert((ev.topic.as_str(), ev.key.as_str()));
            }
            Some(Delivery::Failed {
                error,
                code: reason.as_str().into(),
                permanent: Some(reason),
            })
        })
        .collect()
}

/// Exponential backoff with "equal jitter": half fixed, half random, so retries of many events spread
/// out but never come back sooner than half the nominal delay. `unit` is a random number in [0, 1).
pub fn backoff(attempts_so_far: i32, policy: &RetryPolicy, unit: f64) -> Duration {
    let exp = attempts_so_far.clamp(0, 30) as u32;
    let nominal = policy
        .backoff_base
        .saturating_mul(1u32 << exp.min(20))
        .min(policy.backoff_max);
    nominal / 2 + nominal.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
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
    /// Keep pending: attempts+1, next attempt after `delay`.
    Retry {
        /// Event row id.
        id: i64,
        /// Backoff before the next attempt.
        delay: Duration,
        /// Error recorded in `last_error`.
        error: String,
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
    /// Events acknowledged after an earlier event of the same key in this batch failed: their key's
    /// order is broken. The idempotent producer should make this impossible; it is counted, not hidden.
    pub order_violations: usize,
}

/// Decides the settle action of every event from its delivery. `deliveries[i]` belongs to `batch[i]`;
/// `jitter` yields numbers in [0, 1).
pub fn settle(
    batch: &[ClaimedEvent],
    deliveries: &[Delivery],
    policy: &RetryPolicy,
    mut jitter: impl FnMut() -> f64,
) -> SettlePlan {
    debug_assert_eq!(batch.len(), deliveries.len());
    let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
    let mut plan = SettlePlan::default();
    for (ev, delivery) in batch.iter().zip(deliveries) {
        let key = (ev.topic.as_str(), ev.key.as_str());
        match delivery {
            Delivery::Acked { partition, offset } => {
                if failed_keys.contains(&key) {
                    plan.order_violations += 1;
                }
                plan.actions.push(Settle::Delivered {
                    id: ev.id,
                    partition: *partition,
                    offset: *offset,
                });
            }
            Delivery::Withheld => {}
            Delivery::Failed {
                error, permanent, ..
            } => {
                failed_keys.insert(key);
                let attempts = ev.attempts + 1;
                let dead = permanent
                    .or((attempts >= policy.max_attempts).then_some(DeadReason::MaxAttempts));
                plan.actions.push(match dead {
                    Some(reason) => Settle::Dead {
                        id: ev.id,
                        reason,
                        error: error.clone(),
                        parked: policy.poison == PoisonPolicy::ParkKey,
                    },
                    None => Settle::Retry {
                        id: ev.id,
                        delay: backoff(ev.attempts, policy, jitter()),
                        error: error.clone(),
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
                permanent: Some(DeadReason::TooLarge),
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
            matches!(&slots[0], Some(Delivery::Failed { permanent: Some(DeadReason::InvalidTopic), error, .. }) if error.contains("illegal character"))
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
            permanent: None,
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
                permanent: None,
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
                permanent: Some(DeadReason::TooLarge),
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
}
