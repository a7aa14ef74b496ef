//! Fuzzing the consumer's record decoding (the bytes any producer can put on the topic): keys, payloads
//! and headers of any bytes, `event_id` headers of any text. Decoding never panics, accepts a record exactly
//! when its headers and key are UTF-8 and the last `event_id` header is a UUID, and keeps everything it
//! accepts unchanged; the demo handler's payload parse turns any payload into a value or a permanent
//! failure (DLQ), never a retry loop. Budget and replay: see `test_support::fuzz`.

use consumer_runtime::demo;
use consumer_runtime::message::decode_parts;
use consumer_runtime::HandlerError;
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

fn payload() -> impl Strategy<Value = Vec<u8>> {
    let id = any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string());
    let json = (
        proptest::option::of(id),
        proptest::option::of(any::<String>()),
        any::<bool>(),
    )
        .prop_map(|(id, customer, items)| {
            let mut o = serde_json::Map::new();
            if let Some(id) = id {
                o.insert("order_id".into(), id.into());
            }
            if let Some(c) = customer {
                o.insert("customer".into(), c.into());
            }
            if items {
                o.insert(
                    "items".into(),
                    serde_json::json!([{"sku": "a", "quantity": 1}]),
                );
            }
            serde_json::to_vec(&o).unwrap()
        });
    prop_oneof![json, bytes()]
}

#[test]
fn the_demo_handler_parses_any_payload_into_an_order_or_a_permanent_failure() {
    let input = (
        payload(),
        prop_oneof![Just(Some("OrderCreated")), Just(Some("Other")), Just(None)],
    );
    fuzz(
        "demo OrderCreated payload",
        input,
        |(payload, event_type)| {
            let mut headers = std::collections::BTreeMap::new();
            if let Some(t) = event_type {
                headers.insert("event_type".to_owned(), t.to_owned());
            }
            let msg = consumer_runtime::Message {
                event_id: Uuid::nil(),
                topic: "orders".into(),
                key: None,
                payload: payload.clone(),
                headers,
                partition: 0,
                offset: 0,
            };
            match (event_type, demo::parse(&msg)) {
                (Some("OrderCreated"), Ok(Some(order))) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    let id = order.order_id.to_string();
                    prop_assert_eq!(v["order_id"].as_str(), Some(id.as_str()));
                }
                (Some("OrderCreated"), Err(HandlerError::Permanent(reason))) => {
                    prop_assert!(reason.starts_with("OrderCreated payload: "), "{}", reason)
                }
                (Some("OrderCreated"), other) => prop_assert!(false, "{:?}", other),
                (_, got) => prop_assert!(matches!(got, Ok(None)), "{:?}", got),
            }
            Ok(())
        },
    );
}
