//! Fuzzing `NewEvent` validation (the library's entry point for application data) against an independent
//! statement of the rules: whatever the topic, key, payload, headers and optional fields, `validate::event`
//! accepts exactly the events the rules allow, and a refusal names the first field at fault. Budget and
//! replay: see `test_support::fuzz` (`make fuzz` runs it for minutes).

use std::collections::BTreeMap;

use outbox::validate::{self, MAX_KEY_BYTES, MAX_TOPIC_LEN};
use outbox::NewEvent;
use proptest::prelude::*;
use test_support::fuzz::fuzz;

const MAX_PAYLOAD: usize = 512;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._-]{0,12}",
        any::<String>(),
        "[ -~\t\n\0\u{7f}\u{85}é]{0,8}",
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(String::new()),
    ]
}

fn long(min: usize, max: usize) -> impl Strategy<Value = String> {
    (min..=max, prop_oneof![Just('x'), Just('é'), Just('/')])
        .prop_map(|(n, c)| c.to_string().repeat(n))
}

fn event() -> impl Strategy<Value = NewEvent> {
    let topic = prop_oneof![3 => text(), 1 => long(MAX_TOPIC_LEN - 2, MAX_TOPIC_LEN + 2)];
    let key = prop_oneof![3 => text(), 1 => long(MAX_KEY_BYTES / 2 - 2, MAX_KEY_BYTES + 2)];
    let optional = || proptest::option::of(text());
    (
        topic,
        key,
        proptest::collection::vec(any::<u8>(), 0..MAX_PAYLOAD + 8),
        proptest::collection::btree_map(text(), text(), 0..4),
        optional(),
        optional(),
        optional(),
    )
        .prop_map(
            |(topic, key, payload, headers, event_type, aggregate_type, aggregate_id)| NewEvent {
                topic,
                key,
                payload,
                headers,
                event_type,
                aggregate_type,
                aggregate_id,
            },
        )
}

/// The rules, written again from the documentation: the first field at fault, or none.
fn first_fault(ev: &NewEvent) -> Option<String> {
    let t = &ev.topic;
    let topic_ok = !t.is_empty()
        && t.len() <= MAX_TOPIC_LEN
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !topic_ok {
        return Some("topic".into());
    }
    if ev.key.is_empty() || ev.key.len() > MAX_KEY_BYTES || ev.key.contains('\0') {
        return Some("key".into());
    }
    if ev.payload.len() > MAX_PAYLOAD {
        return Some("payload".into());
    }
    for (name, value) in &ev.headers {
        if name.is_empty() {
            return Some("headers".into());
        }
        if !name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Some(format!("headers.{}", name.escape_debug()));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Some(format!("headers.{name}"));
        }
    }
    for (field, v) in [
        ("event_type", &ev.event_type),
        ("aggregate_type", &ev.aggregate_type),
        ("aggregate_id", &ev.aggregate_id),
    ] {
        if v.as_ref().is_some_and(|v| v.is_empty() || v.contains('\0')) {
            return Some(field.into());
        }
    }
    None
}

#[test]
fn new_event_validation_accepts_exactly_what_the_rules_allow() {
    fuzz("NewEvent validation", event(), |ev| {
        let got = validate::event(&ev, MAX_PAYLOAD);
        match (first_fault(&ev), got) {
            (None, Ok(())) => {
                // What is accepted can be stored: jsonb holds the headers (no NUL anywhere).
                let headers: BTreeMap<&str, &str> = ev
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let json = serde_json::to_string(&headers).unwrap();
                prop_assert!(!json.contains("\\u0000"), "{json}");
            }
            (Some(field), Err(e)) => {
                prop_assert_eq!(&e.field, &field, "{}", e);
                prop_assert!(!e.reason.is_empty());
            }
            (want, got) => prop_assert!(false, "rules say {:?}, validation said {:?}", want, got),
        }
        Ok(())
    });
}
