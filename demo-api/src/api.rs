//! The HTTP API: orders, generic messages, delivery receipts, plus the shared probe endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox::{NewEvent, Outbox};
use process_kit::surfaces::Surface;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::orders::{parse_message, parse_order, Rejection};
use crate::receipts::{receipt, Sources};

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Database with the shop and outbox schemas.
    pub pool: PgPool,
    /// Where events are written.
    pub outbox: Outbox,
    /// Table of orders, schema-qualified.
    pub orders_table: String,
    /// Topic of `OrderCreated` events.
    pub orders_topic: String,
    /// Topics `POST /messages` accepts.
    pub known_topics: Vec<String>,
    /// `?crash=after-commit` is honoured (DEMO_ALLOW_CRASH=1).
    pub allow_crash: bool,
    /// Tables read for receipts.
    pub receipts: Sources,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Database reachable (kept current by a monitor).
    pub database_up: Arc<AtomicBool>,
}

/// An error answer: status and a JSON body naming the field and the reason.
#[derive(Debug)]
pub struct ApiError(StatusCode, Rejection);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl ApiError {
    /// The rejection's kind (`invalid_field`, `malformed_json`, ...).
    pub fn kind(&self) -> &'static str {
        self.1.error
    }

    fn invalid(r: Rejection) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, r)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!("database: {e}");
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            Rejection {
                error: "database_unavailable",
                field: None,
                reason: "the database did not answer; nothing was written".into(),
            },
        )
    }
}

impl From<outbox::Error> for ApiError {
    fn from(e: outbox::Error) -> Self {
        match e {
            outbox::Error::Invalid(v) => Self::invalid(Rejection::field(v.field, v.reason)),
            outbox::Error::Json(j) => Self::invalid(Rejection::field("payload", j.to_string())),
            outbox::Error::Db(d) => d.into(),
            outbox::Error::Migrate(m) => sqlx::Error::from(m).into(),
        }
    }
}

/// Parses a JSON request body: 415 without a JSON content type, 400 when it does not parse.
fn json_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection {
                error: "unsupported_media_type",
                field: None,
                reason: "send the body as Content-Type: application/json".into(),
            },
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            Rejection {
                error: "malformed_json",
                field: None,
                reason: e.to_string(),
            },
        )
    })
}

fn uuid_param(raw: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            Rejection::field(field, format!("`{raw}` is not a UUID")),
        )
    })
}

fn not_found(what: String) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        Rejection {
            error: "not_found",
            field: None,
            reason: what,
        },
    )
}

/// The `crash` query parameter: only `after-commit`, only when allowed.
fn crash_after_commit(q: &HashMap<String, String>, allowed: bool) -> Result<bool, ApiError> {
    match q.get("crash").map(String::as_str) {
        None => Ok(false),
        Some("after-commit") if allowed => Ok(true),
        Some("after-commit") => Err(ApiError::invalid(Rejection::field(
            "crash",
            "crash simulation is disabled; start demo-api with DEMO_ALLOW_CRASH=1",
        ))),
        Some(other) => Err(ApiError::invalid(Rejection::field(
            "crash",
            format!("unknown value `{other}`; the only one is `after-commit`"),
        ))),
    }
}

/// The `commit_delay_ms` query parameter: hold the order's transaction open that long before its commit
/// (a writer committing late, for the chaos soak); only when crash simulation is allowed, at most 10 s.
fn commit_delay(q: &HashMap<String, String>, allowed: bool) -> Result<Duration, ApiError> {
    let Some(v) = q.get("commit_delay_ms") else {
        return Ok(Duration::ZERO);
    };
    if !allowed {
        return Err(ApiError::invalid(Rejection::field(
            "commit_delay_ms",
            "commit delays are disabled; start demo-api with DEMO_ALLOW_CRASH=1",
        )));
    }
    match v.parse::<u64>() {
        Ok(ms) if ms <= 10_000 => Ok(Duration::from_millis(ms)),
        _ => Err(ApiError::invalid(Rejection::field(
            "commit_delay_ms",
            format!("`{v}` is not a number of milliseconds from 0 to 10000"),
        ))),
    }
}

// A span per request: with trace export on, the event's `traceparent` (written in the same transaction)
// names it, so the relay and the consumers continue this trace.
#[tracing::instrument(name = "POST /orders", skip_all, fields(trace_id = tracing::field::Empty))]
async fn create_order(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    process_kit::trace_id::record_trace_id(&tracing::Span::current());
    let r = async {
        let crash = crash_after_commit(&q, s.allow_crash)?;
        let delay = commit_delay(&q, s.allow_crash)?;
        let order = parse_order(&json_body(&headers, &body)?).map_err(ApiError::invalid)?;
        let id = Uuid::now_v7();
        let items = serde_json::to_value(&order.items).expect("items serialize");
        let payload = json!({"order_id": id, "customer": order.customer, "items": items});
        // Keyed by customer: one customer's orders reach every consumer in the order they were placed.
        let event = NewEvent::new(&s.orders_topic, &order.customer)
            .json(&payload)?
            .event_type("OrderCreated")
            .aggregate("order", id.to_string());
        let mut tx = s.pool.begin().await?;
        let event_id = s.outbox.publish(&mut tx, event).await?;
        let created_at: DateTime<Utc> = sqlx::query_scalar(&format!(
            "INSERT INTO {} (id, customer, items, event_id) VALUES ($1, $2, $3, $4) RETURNING created_at",
            s.orders_table
        ))
        .bind(id)
        .bind(&order.customer)
        .bind(&items)
        .bind(event_id)
        .fetch_one(&mut *tx)
        .await?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        tx.commit().await?;
        if crash {
            tracing::error!(order_id = %id, %event_id, "crash=after-commit: exiting right after the commit");
            std::process::exit(3);
        }
        s.metrics.orders_created.inc();
        let body = json!({
            "order": {"id": id, "customer": order.customer, "items": items, "created_at": created_at},
            "event_id": event_id,
        });
        Ok((
            StatusCode::CREATED,
            [(header::LOCATION, format!("/orders/{id}"))],
            Json(body),
        )
            .into_response())
    }
    .await;
    s.metrics.count(&r);
    r
}

async fn get_order(
    State(s): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = uuid_param(&raw, "id")?;
    let row: Option<(String, Value, Uuid, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT customer, items, event_id, created_at FROM {} WHERE id = $1",
        s.orders_table
    ))
    .bind(id)
    .fetch_optional(&s.pool)
    .await?;
    let (customer, items, event_id, created_at) =
        row.ok_or_else(|| not_found(format!("no order {id}")))?;
    Ok(Json(json!({
        "order": {"id": id, "customer": customer, "items": items, "created_at": created_at},
        "event_id": event_id,
        "receipt": format!("/events/{event_id}"),
    })))
}

#[tracing::instrument(name = "POST /messages", skip_all)]
async fn post_message(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = async {
        let m = parse_message(&json_body(&headers, &body)?, &s.known_topics)
            .map_err(ApiError::invalid)?;
        let mut event = NewEvent::new(&m.topic, &m.key).json(&m.payload)?;
        if let Some(t) = &m.event_type {
            event = event.event_type(t);
        }
        for (k, v) in &m.headers {
            event = event.header(k, v);
        }
        let mut tx = s.pool.begin().await?;
        let event_id = s.outbox.publish(&mut tx, event).await?;
        tx.commit().await?;
        s.metrics.messages_published.inc();
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"event_id": event_id, "receipt": format!("/events/{event_id}")})),
        )
            .into_response())
    }
    .await;
    s.metrics.count(&r);
    r
}

async fn get_receipt(
    State(s): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = uuid_param(&raw, "event_id")?;
    let r = receipt(&s.pool, &s.receipts, id)
        .await?
        .ok_or_else(|| not_found(format!("no event {id}")))?;
    Ok(Json(r).into_response())
}

impl Surface for AppState {
    fn readiness(&self) -> (bool, Value) {
        let db = self.database_up.load(Ordering::Relaxed);
        (db, json!({"ready": db, "database": db}))
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// The whole API.
pub fn router(s: AppState) -> Router {
    let probes = process_kit::surfaces::router(Arc::new(s.clone()));
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/messages", post(post_message))
        .route("/events/{event_id}", get(get_receipt))
        .with_state(s)
        .merge(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_delay_needs_permission_and_a_bounded_number() {
        let q = |v: &str| HashMap::from([("commit_delay_ms".to_owned(), v.to_owned())]);
        assert_eq!(
            commit_delay(&HashMap::new(), false).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            commit_delay(&q("1500"), true).unwrap(),
            Duration::from_millis(1500)
        );
        assert!(commit_delay(&q("1500"), false).is_err());
        assert!(commit_delay(&q("10001"), true).is_err());
        assert!(commit_delay(&q("soon"), true).is_err());
    }

    #[test]
    fn crash_needs_permission_and_the_one_known_value() {
        let q = |v: &str| HashMap::from([("crash".to_owned(), v.to_owned())]);
        assert!(!crash_after_commit(&HashMap::new(), false).unwrap());
        assert!(crash_after_commit(&q("after-commit"), true).unwrap());
        let e = crash_after_commit(&q("after-commit"), false).unwrap_err();
        assert_eq!(e.0, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.1.reason.contains("DEMO_ALLOW_CRASH=1"));
        assert_eq!(
            crash_after_commit(&q("before"), true)
                .unwrap_err()
                .1
                .field
                .as_deref(),
            Some("crash")
        );
    }
}
