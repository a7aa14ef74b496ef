//! The order request: validated field by field, so every rejection names the field that is wrong.

use serde::Serialize;
use serde_json::Value;

/// A 4xx answer's body: `{"error": ..., "field": ..., "reason": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Machine-readable kind: `malformed_json`, `invalid_field`, `unsupported_media_type`, `not_found`.
    pub error: &'static str,
    /// The offending field as a path (`items[1].quantity`), when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for a human.
    pub reason: String,
}

impl Rejection {
    /// A field that is missing or has a wrong value.
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            error: "invalid_field",
            field: Some(field.into()),
            reason: reason.into(),
        }
    }
}

/// One ordered item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// Stock-keeping unit.
    pub sku: String,
    /// How many (1..=1000).
    pub quantity: i64,
}

/// A valid order request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    /// Customer name (1..=100 characters).
    pub customer: String,
    /// 1..=100 items.
    pub items: Vec<Item>,
}

/// Most items per order.
pub const MAX_ITEMS: usize = 100;

fn string(v: &Value, field: &str, max: usize) -> Result<String, Rejection> {
    match v.get(field) {
        None | Some(Value::Null) => Err(Rejection::field(field, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(Rejection::field(field, "must not be empty"))
        }
        Some(Value::String(s)) if s.chars().count() > max => Err(Rejection::field(
            field,
            format!("must be at most {max} characters"),
        )),
        // PostgreSQL text cannot hold NUL: refuse it here, not as a failed INSERT.
        Some(Value::String(s)) if s.contains('\0') => {
            Err(Rejection::field(field, "must not contain NUL (\\u0000)"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Rejection::field(field, "must be a string")),
    }
}

/// Validates a parsed JSON body as an order (pure).
pub fn parse_order(body: &Value) -> Result<OrderRequest, Rejection> {
    if !body.is_object() {
        return Err(Rejection {
            error: "invalid_field",
            field: None,
            reason: "the body must be a JSON object".into(),
        });
    }
    let customer = string(body, "customer", 100)?;
    let items = match body.get("items") {
        None | Some(Value::Null) => return Err(Rejection::field("items", "is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(Rejection::field("items", "must hold at least one item"))
        }
        Some(Value::Array(a)) if a.len() > MAX_ITEMS => {
            return Err(Rejection::field(
                "items",
                format!("must hold at most {MAX_ITEMS} items"),
            ))
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Rejection::field("items", "must be an array")),
    };
    let items = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |f: &str| format!("items[{i}].{f}");
            let sku = string(item, "sku", 64).map_err(|r| Rejection {
                field: Some(at("sku")),
                ..r
            })?;
            let quantity = match item.get("quantity") {
                None | Some(Value::Null) => Err(Rejection::field(at("quantity"), "is required")),
                Some(q) => match q.as_i64() {
                    Some(q) if (1..=1000).contains(&q) => Ok(q),
                    Some(_) => Err(Rejection::field(
                        at("quantity"),
                        "must be between 1 and 1000",
                    )),
                    None => Err(Rejection::field(at("quantity"), "must be an integer")),
                },
            }?;
            Ok(Item { sku, quantity })
        })
        .collect::<Result<Vec<_>, Rejection>>()?;
    Ok(OrderRequest { customer, items })
}

/// A valid generic message (`POST /messages`).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRequest {
    /// Destination topic (must be one the API is configured for).
    pub topic: String,
    /// Record key (per-key order).
    pub key: String,
    /// Any JSON value, published as its JSON text.
    pub payload: Value,
    /// Optional event type header.
    pub event_type: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

/// Validates a parsed JSON body as a generic message against the known topics (pure).
pub fn parse_message(body: &Value, known_topics: &[String]) -> Result<MessageRequest, Rejection> {
    if !body.is_object() {
        return Err(Rejection {
            error: "invalid_field",
            field: None,
            reason: "the body must be a JSON object".into(),
        });
    }
    let topic = string(body, "topic", 249)?;
    if !known_topics.contains(&topic) {
        return Err(Rejection::field(
            "topic",
            format!(
                "unknown topic `{topic}`; known: {}",
                known_topics.join(", ")
            ),
        ));
    }
    let key = string(body, "key", 1024)?;
    let payload = match body.get("payload") {
        None => return Err(Rejection::field("payload", "is required")),
        Some(p) => p.clone(),
    };
    let event_type = match body.get("event_type") {
        None | Some(Value::Null) => None,
        Some(_) => Some(string(body, "event_type", 200)?),
    };
    let headers = match body.get("headers") {
        None | Some(Value::Null) => vec![],
        Some(Value::Object(h)) => h
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(Rejection::field(format!("headers.{k}"), "must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Rejection::field("headers", "must be an object of strings")),
    };
    Ok(MessageRequest {
        topic,
        key,
        payload,
        event_type,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(r: Result<OrderRequest, Rejection>) -> (String, String) {
        let r = r.unwrap_err();
        (r.field.unwrap_or_default(), r.reason)
    }

    #[test]
    fn a_valid_order_parses() {
        let o =
            parse_order(&json!({"customer": "ann", "items": [{"sku": "aspirin", "quantity": 2}]}))
                .unwrap();
        assert_eq!(o.customer, "ann");
        assert_eq!(o.items[0].quantity, 2);
    }

    #[test]
    fn every_bad_order_field_is_named() {
        let cases = [
            (
                json!({"items": [{"sku": "a", "quantity": 1}]}),
                "customer",
                "is required",
            ),
            (
                json!({"customer": 5, "items": []}),
                "customer",
                "must be a string",
            ),
            (
                json!({"customer": " ", "items": []}),
                "customer",
                "must not be empty",
            ),
            (
                json!({"customer": "x".repeat(101), "items": []}),
                "customer",
                "at most 100",
            ),
            (json!({"customer": "a"}), "items", "is required"),
            (
                json!({"customer": "a", "items": {}}),
                "items",
                "must be an array",
            ),
            (
                json!({"customer": "a", "items": []}),
                "items",
                "at least one",
            ),
            (
                json!({"customer": "a", "items": [{"quantity": 1}]}),
                "items[0].sku",
                "is required",
            ),
            (
                json!({"customer": "a", "items": [{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": 0}]}),
                "items[1].quantity",
                "between 1 and 1000",
            ),
            (
                json!({"customer": "a", "items": [{"sku": "a", "quantity": "2"}]}),
                "items[0].quantity",
                "must be an integer",
            ),
        ];
        for (body, field, reason) in cases {
            let (f, r) = field_of(parse_order(&body));
            assert_eq!(f, field, "{body}");
            assert!(r.contains(reason), "{body}: {r}");
        }
        assert!(parse_order(&json!([1])).unwrap_err().field.is_none());
    }

    #[test]
    fn messages_need_a_known_topic_a_key_and_a_payload() {
        let known = vec!["orders".to_owned()];
        let ok = parse_message(
            &json!({"topic": "orders", "key": "k", "payload": {"a": 1}, "headers": {"x": "y"}}),
            &known,
        )
        .unwrap();
        assert_eq!(ok.headers, vec![("x".to_owned(), "y".to_owned())]);
        let err = |b: Value| parse_message(&b, &known).unwrap_err();
        let r = err(json!({"topic": "payments", "key": "k", "payload": 1}));
        assert_eq!(r.field.as_deref(), Some("topic"));
        assert!(r.reason.contains("unknown topic `payments`"));
        assert_eq!(
            err(json!({"topic": "orders", "payload": 1}))
                .field
                .as_deref(),
            Some("key")
        );
        assert_eq!(
            err(json!({"topic": "orders", "key": "k"})).field.as_deref(),
            Some("payload")
        );
        assert_eq!(
            err(json!({"topic": "orders", "key": "k", "payload": 1, "headers": {"h": 1}}))
                .field
                .as_deref(),
            Some("headers.h")
        );
    }
}
