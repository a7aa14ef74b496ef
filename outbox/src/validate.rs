//! Pure validation of events and names, shared by the writer side and the relay.

use crate::NewEvent;

/// Kafka's limit on topic name length.
pub const MAX_TOPIC_LEN: usize = 249;
/// Upper bound on key length (keys are ordering units, not payloads).
pub const MAX_KEY_BYTES: usize = 4096;

/// Why an event (or a name) was rejected: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct ValidationError {
    /// The field at fault, e.g. `topic`, `payload`, `headers.x-trace`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a Kafka topic name: 1–249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn topic(name: &str) -> Result<(), ValidationError> {
    let err = |reason: String| Err(ValidationError::new("topic", reason));
    if name.is_empty() {
        return err("must not be empty".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return err(format!(
            "is {} characters long, the maximum is {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return err(format!("`{name}` is not a legal topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return err(format!(
            "contains illegal character {c:?} (allowed: a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(())
}

/// Checks a record key: not empty, at most [`MAX_KEY_BYTES`] bytes, no NUL (the key is stored as text,
/// which in PostgreSQL cannot hold NUL).
pub fn key(key: &str) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::new(
            "key",
            "must not be empty (the key is the ordering unit)",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ValidationError::new(
            "key",
            format!("is {} bytes, the maximum is {MAX_KEY_BYTES}", key.len()),
        ));
    }
    if key.contains('\0') {
        return Err(ValidationError::new(
            "key",
            "contains NUL (\\u0000), which PostgreSQL text cannot store",
        ));
    }
    Ok(())
}

/// Checks one header. Names are visible ASCII without spaces; values may not contain control characters
/// (other than tab) — PostgreSQL's jsonb cannot store NUL, and Kafka tooling prints headers as text.
pub fn header(name: &str, value: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new(
            "headers",
            "a header name must not be empty",
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ValidationError::new(
            format!("headers.{}", name.escape_debug()),
            format!("header name contains {c:?}; only visible ASCII without spaces is allowed"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(ValidationError::new(
            format!("headers.{name}"),
            format!("header value contains control character {c:?}"),
        ));
    }
    Ok(())
}

/// Validates a whole event against a payload limit.
pub fn event(ev: &NewEvent, max_payload_bytes: usize) -> Result<(), ValidationError> {
    topic(&ev.topic)?;
    key(&ev.key)?;
    if ev.payload.len() > max_payload_bytes {
        return Err(ValidationError::new(
            "payload",
            format!(
                "is {} bytes, the configured maximum is {max_payload_bytes}",
                ev.payload.len()
            ),
        ));
    }
    for (name, value) in &ev.headers {
        header(name, value)?;
    }
    for (field, value) in [
        ("event_type", &ev.event_type),
        ("aggregate_type", &ev.aggregate_type),
        ("aggregate_id", &ev.aggregate_id),
    ] {
        if let Some(v) = value {
            if v.is_empty() || v.contains('\0') {
                return Err(ValidationError::new(
                    field,
                    "must be non-empty text without NUL when set",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_topics_pass() {
        for t in ["orders", "a", "Orders.v1_x-y", &"x".repeat(249)] {
            assert_eq!(topic(t), Ok(()), "{t}");
        }
    }

    #[test]
    fn illegal_topics_name_the_reason() {
        let cases = [
            ("", "must not be empty"),
            (".", "not a legal topic name"),
            ("..", "not a legal topic name"),
            ("has space", "illegal character ' '"),
            ("sl/ash", "illegal character '/'"),
            ("ünï", "illegal character 'ü'"),
        ];
        for (t, reason) in cases {
            let e = topic(t).unwrap_err();
            assert_eq!(e.field, "topic");
            assert!(e.reason.contains(reason), "{t:?}: {}", e.reason);
        }
        assert!(topic(&"x".repeat(250))
            .unwrap_err()
            .reason
            .contains("250 characters"));
    }

    #[test]
    fn headers_are_checked_by_name_and_value() {
        assert!(header("traceparent", "00-abc").is_ok());
        assert!(header("tab", "a\tb").is_ok());
        assert_eq!(header("", "v").unwrap_err().field, "headers");
        assert_eq!(
            header("bad name", "v").unwrap_err().field,
            "headers.bad name"
        );
        let e = header("x", "a\0b").unwrap_err();
        assert_eq!(e.field, "headers.x");
        assert!(e.reason.contains("control character"));
    }

    #[test]
    fn payload_limit_is_enforced() {
        let ev = NewEvent::new("t", "k").payload(vec![0u8; 11]);
        assert!(event(&ev, 11).is_ok());
        let e = event(&ev, 10).unwrap_err();
        assert_eq!(e.field, "payload");
        assert!(e.reason.contains("11 bytes"));
    }

    #[test]
    fn key_and_optional_fields() {
        assert_eq!(event(&NewEvent::new("t", ""), 10).unwrap_err().field, "key");
        // Found by fuzzing: a NUL passed validation and then failed the INSERT as a database error.
        let nul = event(&NewEvent::new("t", "a\0b"), 10).unwrap_err();
        assert_eq!(nul.field, "key");
        assert!(nul.reason.contains("NUL"), "{nul}");
        assert_eq!(
            event(&NewEvent::new("t", "k").event_type(""), 10)
                .unwrap_err()
                .field,
            "event_type"
        );
        assert_eq!(
            event(&NewEvent::new("t", "k").aggregate("a\0", "1"), 10)
                .unwrap_err()
                .field,
            "aggregate_type"
        );
    }
}
