//! The event as a handler sees it, decoded from a Kafka record.

use std::collections::BTreeMap;

use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use uuid::Uuid;

/// A consumed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stable id set by the outbox (header `event_id`); the inbox deduplicates on it.
    pub event_id: Uuid,
    /// Topic it came from.
    pub topic: String,
    /// Record key.
    pub key: Option<String>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Headers as text.
    pub headers: BTreeMap<String, String>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Message {
    /// The `event_type` header, when present.
    pub fn event_type(&self) -> Option<&str> {
        self.headers.get("event_type").map(String::as_str)
    }

    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Why a record cannot become a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable record: {0}")]
pub struct Undecodable(pub String);

/// Decodes the parts of a record (pure, so it is tested without a broker).
pub fn decode_parts(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: Vec<(String, Option<Vec<u8>>)>,
) -> Result<Message, Undecodable> {
    let mut text = BTreeMap::new();
    for (k, v) in headers {
        let v = v.unwrap_or_default();
        let v =
            String::from_utf8(v).map_err(|_| Undecodable(format!("header `{k}` is not UTF-8")))?;
        text.insert(k, v);
    }
    let raw = text
        .get("event_id")
        .ok_or_else(|| Undecodable("no `event_id` header".into()))?;
    let event_id =
        Uuid::parse_str(raw).map_err(|e| Undecodable(format!("header `event_id` {raw:?}: {e}")))?;
    let key = key
        .map(|k| String::from_utf8(k.to_vec()).map_err(|_| Undecodable("key is not UTF-8".into())))
        .transpose()?;
    Ok(Message {
        event_id,
        topic: topic.to_owned(),
        key,
        payload: payload.unwrap_or_default().to_vec(),
        headers: text,
        partition,
        offset,
    })
}

/// Decodes a consumed record.
pub fn decode(m: &BorrowedMessage<'_>) -> Result<Message, Undecodable> {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    decode_parts(
        m.topic(),
        m.partition(),
        m.offset(),
        m.key(),
        m.payload(),
        headers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_event_id_and_headers() {
        let id = Uuid::now_v7();
        let m = decode_parts(
            "orders",
            2,
            7,
            Some(b"k"),
            Some(b"{\"a\":1}"),
            vec![
                ("event_id".into(), Some(id.to_string().into_bytes())),
                ("event_type".into(), Some(b"X".to_vec())),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                m.event_id,
                m.partition,
                m.offset,
                m.key.as_deref(),
                m.event_type()
            ),
            (id, 2, 7, Some("k"), Some("X"))
        );
        assert_eq!(m.json::<serde_json::Value>().unwrap()["a"], 1);
    }

    #[test]
    fn missing_or_bad_event_id_is_undecodable_with_reason() {
        let e = decode_parts("t", 0, 0, None, None, vec![]).unwrap_err();
        assert!(e.0.contains("no `event_id`"));
        let e = decode_parts(
            "t",
            0,
            0,
            None,
            None,
            vec![("event_id".into(), Some(b"nope".to_vec()))],
        )
        .unwrap_err();
        assert!(e.0.contains("\"nope\""), "{e}");
        let e =
            decode_parts("t", 0, 0, None, None, vec![("x".into(), Some(vec![0xff]))]).unwrap_err();
        assert!(e.0.contains("not UTF-8"));
    }
}
