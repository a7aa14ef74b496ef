//! Fuzzing the consumer's record decoding (the bytes any producer can put on the topic): keys, payloads
//! and headers of any bytes, `event_id` headers of any text. Decoding never panics, accepts a record exactly
//! when its headers and key are UTF-8 and the last `event_id` header is a UUID, and keeps everything it
//! accepts unchanged (the demo handler's payload parse is fuzzed in the `demo-consumer` crate). Budget and replay: see `test_support::fuzz`.

use consumer_runtime::message::decode_parts;
use proptest::prelude::*;
use test_support::fuzz::fuzz;
use uuid::Uuid;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        any::<String>().prop_map(String::into_bytes),
    ]
}

fn event_id_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().into_bytes()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).simple().to_string().into_bytes()),
        any::<u128>().prop_map(|n| format!(" {}", Uuid::from_u128(n)).into_bytes()),
        "[0-9a-f-]{30,40}".prop_map(String::into_bytes),
        bytes(),
    ]
}

type Header = (String, Option<Vec<u8>>);

fn headers() -> impl Strategy<Value = Vec<Header>> {
    let name = prop_oneof![
        Just("event_id".to_owned()),
        Just("event_type".to_owned()),
        Just("traceparent".to_owned()),
        any::<String>(),
    ];
    let header = prop_oneof![
        (
            Just("event_id".to_owned()),
            proptest::option::of(event_id_text())
        ),
        (name, proptest::option::of(bytes())),
    ];
    proptest::collection::vec(header, 0..5)
}

#[test]
fn record_decoding_accepts_exactly_the_well_formed_records_and_keeps_them_intact() {
    let record = (
        proptest::option::of(bytes()),
        proptest::option::of(bytes()),
        headers(),
        any::<i32>(),
        any::<i64>(),
    );
    fuzz(
        "consumer record decoding",
        record,
        |(key, payload, headers, partition, offset)| {
            let got = decode_parts(
                "orders",
                partition,
                offset,
                key.as_deref(),
                payload.as_deref(),
                headers.clone(),
            );
            // The rules: every header UTF-8 (a missing value is empty), the last `event_id` a UUID, key UTF-8.
            let texts: Option<Vec<(String, String)>> = headers
                .iter()
                .map(|(k, v)| {
                    Some((
                        k.clone(),
                        String::from_utf8(v.clone().unwrap_or_default()).ok()?,
                    ))
                })
                .collect();
            let event_id = texts.as_ref().and_then(|t| {
                let raw = t.iter().rev().find(|(k, _)| k == "event_id")?;
                Uuid::parse_str(&raw.1).ok()
            });
            let key_text = key.clone().map(String::from_utf8).transpose().ok();
            match (event_id, key_text, got) {
                (Some(id), Some(key_text), Ok(m)) => {
                    prop_assert_eq!(m.event_id, id);
                    prop_assert_eq!(m.key, key_text);
                    prop_assert_eq!(m.payload, payload.unwrap_or_default());
                    prop_assert_eq!((m.partition, m.offset), (partition, offset));
                    let last: std::collections::BTreeMap<String, String> =
                        texts.unwrap().into_iter().collect();
                    prop_assert_eq!(m.headers, last);
                }
                (_, _, Err(e)) => prop_assert!(e.to_string().starts_with("undecodable record: ")),
                (id, key, Ok(m)) => prop_assert!(
                    false,
                    "accepted {:?} although event_id={:?} key={:?}",
                    m,
                    id,
                    key
                ),
            }
            Ok(())
        },
    );
}
