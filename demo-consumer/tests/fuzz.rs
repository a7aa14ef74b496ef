//! Fuzzing the demo handler's payload parse (any bytes a producer can put on the topic): it turns any
//! payload into an order or a permanent failure (DLQ), never a retry loop. Budget and replay: see
//! `test_support::fuzz`.

use consumer_runtime::HandlerError;
use demo_consumer as demo;
use proptest::prelude::*;
use test_support::fuzz::fuzz;
use uuid::Uuid;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        any::<String>().prop_map(String::into_bytes),
    ]
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
