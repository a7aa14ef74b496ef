//! Fuzzing the demo API's request bodies: any bytes, and JSON trees shaped like orders and messages with
//! wrong types, sizes and characters in every field. Parsing never panics; what it accepts obeys every
//! documented limit and can be stored (PostgreSQL text holds no NUL); what it refuses names the field at
//! fault. Budget and replay: see `test_support::fuzz`.

use demo_api::orders::{parse_message, parse_order, MAX_ITEMS};
use proptest::prelude::*;
use serde_json::{json, Value};
use test_support::fuzz::fuzz;

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-5i64..1005).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z]{1,8}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[ a-z\0\t\n]{0,6}".prop_map(Value::from),
        (95usize..110).prop_map(|n| Value::from("é".repeat(n))),
    ]
}

fn field(name: &'static str) -> impl Strategy<Value = Option<(String, Value)>> {
    proptest::option::weighted(0.85, scalar().prop_map(move |v| (name.to_owned(), v)))
}

fn object(fields: Vec<Option<(String, Value)>>) -> Value {
    Value::Object(fields.into_iter().flatten().collect())
}

fn item() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (field("sku"), field("quantity")).prop_map(|(a, b)| object(vec![a, b])),
        1 => scalar(),
    ]
}

fn order_body() -> impl Strategy<Value = Value> {
    let items = prop_oneof![
        4 => proptest::collection::vec(item(), 0..4).prop_map(Value::Array),
        1 => (MAX_ITEMS..MAX_ITEMS + 2).prop_map(|n| Value::Array(vec![json!({"sku": "a", "quantity": 1}); n])),
        1 => scalar(),
    ];
    prop_oneof![
        8 => (field("customer"), proptest::option::weighted(0.9, items)).prop_map(|(c, i)| {
            object(vec![c, i.map(|i| ("items".to_owned(), i))])
        }),
        1 => scalar(),
    ]
}

fn no_nul(s: &str) -> bool {
    !s.contains('\0')
}

#[test]
fn order_bodies_are_accepted_only_within_the_limits_and_refusals_name_the_field() {
    fuzz("POST /orders body", order_body(), |body| {
        match parse_order(&body) {
            Ok(order) => {
                prop_assert!(
                    !order.customer.trim().is_empty() && order.customer.chars().count() <= 100
                );
                prop_assert!(
                    no_nul(&order.customer),
                    "NUL in an accepted customer: {:?}",
                    order
                );
                prop_assert!((1..=MAX_ITEMS).contains(&order.items.len()));
                for i in &order.items {
                    prop_assert!(
                        !i.sku.trim().is_empty() && i.sku.chars().count() <= 64 && no_nul(&i.sku)
                    );
                    prop_assert!((1..=1000).contains(&i.quantity));
                }
                prop_assert_eq!(body["customer"].as_str(), Some(order.customer.as_str()));
            }
            Err(r) => {
                prop_assert_eq!(r.error, "invalid_field");
                prop_assert!(!r.reason.is_empty());
                match (&r.field, body.is_object()) {
                    (None, false) => {}
                    (Some(f), true) => prop_assert!(
                        f == "customer" || f == "items" || f.starts_with("items["),
                        "{}",
                        f
                    ),
                    (f, obj) => prop_assert!(false, "field {:?} for an object={}", f, obj),
                }
            }
        }
        Ok(())
    });
}

#[test]
fn any_bytes_as_an_order_or_message_body_never_panic() {
    let raw = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        order_body().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    let topics = vec!["orders".to_owned()];
    fuzz("request body bytes", raw, |bytes| {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = parse_order(&v);
            let _ = parse_message(&v, &topics);
        }
        Ok(())
    });
}

fn message_body() -> impl Strategy<Value = Value> {
    let headers = prop_oneof![
        proptest::collection::btree_map("[a-z\0 ]{0,4}", scalar(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        scalar(),
    ];
    (
        proptest::option::weighted(0.9, prop_oneof![Just(json!("orders")), scalar()]),
        field("key"),
        field("payload"),
        field("event_type"),
        proptest::option::of(headers),
    )
        .prop_map(|(topic, key, payload, event_type, headers)| {
            object(vec![
                topic.map(|t| ("topic".to_owned(), t)),
                key,
                payload,
                event_type,
                headers.map(|h| ("headers".to_owned(), h)),
            ])
        })
}

#[test]
fn message_bodies_are_accepted_only_when_storable_and_refusals_name_the_field() {
    let topics = vec!["orders".to_owned()];
    fuzz("POST /messages body", message_body(), |body| {
        match parse_message(&body, &topics) {
            Ok(m) => {
                prop_assert_eq!(m.topic.as_str(), "orders");
                prop_assert!(!m.key.trim().is_empty() && m.key.chars().count() <= 1024);
                // The event the handler builds passes the outbox's validation (422 otherwise) before it
                // is written; what passes both must be storable.
                let mut event = outbox::NewEvent::new(&m.topic, &m.key)
                    .json(&m.payload)
                    .unwrap();
                if let Some(t) = &m.event_type {
                    event = event.event_type(t);
                }
                for (k, v) in &m.headers {
                    event = event.header(k, v);
                }
                if outbox::validate::event(&event, outbox::DEFAULT_MAX_PAYLOAD_BYTES).is_ok() {
                    prop_assert!(no_nul(&m.key), "NUL in an accepted key: {:?}", m);
                    prop_assert!(m.event_type.as_deref().is_none_or(no_nul), "{:?}", m);
                    prop_assert!(
                        m.headers.iter().all(|(k, v)| no_nul(k) && no_nul(v)),
                        "{:?}",
                        m
                    );
                }
            }
            Err(r) => {
                let f = r.field.unwrap_or_default();
                prop_assert!(
                    ["topic", "key", "payload", "event_type", "headers"].contains(&f.as_str())
                        || f.starts_with("headers."),
                    "{}",
                    f
                );
            }
        }
        Ok(())
    });
}
