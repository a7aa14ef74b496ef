//! The librdkafka properties the delivery guarantees rest on. The relay and the consumer runtime set them
//! themselves; `--kafka-config` and `kafka.configSecretRef` may not (the processes exit 2 naming the key
//! and the setting that owns it, the operator reports `InvalidSpec` naming the field). Shared here so the
//! operator refuses on the resource exactly what the pod would refuse at start.

/// Which process a property is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `outbox-relay` (the idempotent producer).
    Relay,
    /// A consumer runtime process.
    Consumer,
}

/// Why `key=value` may not be set for `process`, naming the setting that owns it; `None` when allowed.
pub fn refusal(process: Process, key: &str, value: &str) -> Option<String> {
    let owned = |by: &str| Some(format!("`{key}` is set by {by}; it cannot be overridden"));
    match (process, key) {
        (_, "bootstrap.servers" | "metadata.broker.list") => owned("--brokers (KAFKA_BOOTSTRAP)"),
        (Process::Relay, "acks" | "request.required.acks") => {
            owned("the relay (acks=all: nothing lost rests on it)")
        }
        (Process::Relay, "enable.idempotence") => {
            owned("the relay (the idempotent producer keeps each key's order)")
        }
        (Process::Relay, "max.in.flight.requests.per.connection" | "max.in.flight") => {
            match value.trim().parse::<u32>() {
                Ok(1..=5) => None,
                _ => Some(format!(
                    "`{key}` must be 1 to 5: above 5 the idempotent producer cannot keep each key's order"
                )),
            }
        }
        (Process::Relay, "message.timeout.ms" | "delivery.timeout.ms") => {
            owned("--delivery-timeout (RELAY_DELIVERY_TIMEOUT)")
        }
        (Process::Relay, "partitioner" | "partitioner_cb") => {
            owned("--partitioning (RELAY_PARTITIONING)")
        }
        (Process::Relay, "message.max.bytes") => owned(
            "--max-message-bytes (RELAY_MAX_MESSAGE_BYTES; the relay checks records against it before sending)",
        ),
        (Process::Relay, "retries" | "message.send.max.retries") => {
            owned("the relay (the idempotent producer retries until --delivery-timeout)")
        }
        (Process::Relay, "transactional.id") => Some(format!(
            "`{key}` is refused: the relay's producer is idempotent, not transactional"
        )),
        (Process::Consumer, "enable.auto.offset.store") => {
            owned("the runtime (an offset is stored only after its effect commits)")
        }
        (Process::Consumer, "enable.auto.commit") => {
            owned("the runtime (it commits the offsets it stored)")
        }
        (Process::Consumer, "isolation.level") => {
            owned("the runtime (only committed records are read)")
        }
        (Process::Consumer, "auto.offset.reset") => {
            owned("the runtime (earliest: a new group starts at the first record)")
        }
        (Process::Consumer, "group.id") => owned("--group-id (CONSUMER_GROUP_ID)"),
        (Process::Consumer, "partition.assignment.strategy") => {
            owned("the runtime (cooperative-sticky, the same for every member)")
        }
        (Process::Consumer, "session.timeout.ms") => {
            owned("--session-timeout (CONSUMER_SESSION_TIMEOUT)")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_properties_are_refused_and_others_pass() {
        for key in [
            "acks",
            "enable.idempotence",
            "message.timeout.ms",
            "partitioner",
            "transactional.id",
        ] {
            assert!(refusal(Process::Relay, key, "x").is_some(), "{key}");
            assert!(refusal(Process::Consumer, key, "x").is_none(), "{key}");
        }
        assert!(refusal(Process::Relay, "max.in.flight.requests.per.connection", "5").is_none());
        assert!(refusal(Process::Relay, "max.in.flight.requests.per.connection", "6").is_some());
        for key in [
            "enable.auto.offset.store",
            "enable.auto.commit",
            "isolation.level",
            "auto.offset.reset",
        ] {
            assert!(refusal(Process::Consumer, key, "x").is_some(), "{key}");
        }
        assert!(refusal(Process::Relay, "linger.ms", "5").is_none());
        assert!(refusal(Process::Consumer, "fetch.max.bytes", "1").is_none());
        assert_eq!(
            refusal(Process::Relay, "message.timeout.ms", "1").unwrap(),
            "`message.timeout.ms` is set by --delivery-timeout (RELAY_DELIVERY_TIMEOUT); it cannot be overridden"
        );
    }
}
