//! An event row as claimed by the relay, and how it becomes a Kafka record.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Bytes counted per record for framing and the relay's own headers, on top of key, payload and user
/// headers, when checking `message.max.bytes` before sending.
const RECORD_OVERHEAD_BYTES: usize = 256;

/// One pending event, locked by the claiming transaction.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClaimedEvent {
    /// Claim order (identity).
    pub id: i64,
    /// Stable event id (UUID v7), sent as header `event_id`.
    pub event_id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Record key.
    pub key: String,
    /// Record value.
    pub payload: Vec<u8>,
    /// User headers (a JSON object of strings).
    pub headers: serde_json::Value,
    /// Optional event type.
    pub event_type: Option<String>,
    /// Optional aggregate type.
    pub aggregate_type: Option<String>,
    /// Optional aggregate id.
    pub aggregate_id: Option<String>,
    /// When the event was written.
    pub created_at: DateTime<Utc>,
    /// Failed attempts so far.
    pub attempts: i32,
}

impl ClaimedEvent {
    /// Every header the record carries: the stored ones plus `event_id`, `event_type`, `aggregate_type`,
    /// `aggregate_id` when set.
    pub fn kafka_headers(&self) -> Vec<(String, String)> {
        let mut out = vec![("event_id".to_owned(), self.event_id.to_string())];
        for (name, value) in [
            ("event_type", &self.event_type),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
        ] {
            if let Some(v) = value {
                out.push((name.to_owned(), v.clone()));
            }
        }
        if let Some(map) = self.headers.as_object() {
            for (k, v) in map {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                out.push((k.clone(), v));
            }
        }
        out
    }

    /// A conservative size of the record on the wire, compared with `message.max.bytes`.
    pub fn record_size_estimate(&self) -> usize {
        let headers: usize = self
            .kafka_headers()
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        self.key.len() + self.payload.len() + headers + RECORD_OVERHEAD_BYTES
    }

    /// A minimal event for unit tests.
    #[doc(hidden)]
    pub fn for_test(id: i64, topic: &str, key: &str, payload: Vec<u8>) -> Self {
        Self {
            id,
            event_id: Uuid::now_v7(),
            topic: topic.into(),
            key: key.into(),
            payload,
            headers: serde_json::json!({}),
            event_type: None,
            aggregate_type: None,
            aggregate_id: None,
            created_at: Utc::now(),
            attempts: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_include_ids_and_user_headers() {
        let mut ev = ClaimedEvent::for_test(1, "t", "k", vec![1, 2, 3]);
        ev.event_type = Some("OrderCreated".into());
        ev.headers = serde_json::json!({"traceparent": "00-x"});
        let h = ev.kafka_headers();
        assert_eq!(h[0], ("event_id".into(), ev.event_id.to_string()));
        assert!(h.contains(&("event_type".into(), "OrderCreated".into())));
        assert!(h.contains(&("traceparent".into(), "00-x".into())));
        let listed: usize = h.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        assert_eq!(
            ev.record_size_estimate(),
            3 + 1 + RECORD_OVERHEAD_BYTES + listed
        );
    }
}
