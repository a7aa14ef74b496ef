//! Operator tools: replay from the archive, and the dead-letter table (list, redrive, discard).

use chrono::{DateTime, Utc};
use outbox::SchemaName;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::decide::Delivery;
use crate::event::ClaimedEvent;
use crate::producer::Producer;

/// Which archived events to replay.
#[derive(Debug, Clone)]
pub struct ReplayFilter {
    /// Events created at or after this instant.
    pub since: DateTime<Utc>,
    /// Events created before this instant.
    pub until: DateTime<Utc>,
    /// Only this key.
    pub key: Option<String>,
    /// Only events originally sent to this topic.
    pub topic: Option<String>,
}

const ARCHIVE_COLS: &str =
    "id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, created_at, attempts";

fn replay_where() -> &'static str {
    // published_at >= since lets PostgreSQL prune day partitions: an event is published after it is created.
    "published_at >= $1 AND created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR key = $3) \
     AND ($4::text IS NULL OR topic = $4)"
}

/// Counts the archived events a replay would send.
pub async fn replay_count(
    pool: &PgPool,
    schema: &SchemaName,
    f: &ReplayFilter,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE {}",
        schema.table("archive"),
        replay_where()
    ))
    .bind(f.since)
    .bind(f.until)
    .bind(&f.key)
    .bind(&f.topic)
    .fetch_one(pool)
    .await
}

/// Outcome of a replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Records acknowledged.
    pub sent: u64,
    /// Records that failed.
    pub failed: u64,
}

/// Re-publishes matching archived events in their original order (to `to_topic` when set), with header
/// `outbox.replayed=true`; `on_progress` is called with the number sent after each page.
pub async fn replay(
    pool: &PgPool,
    schema: &SchemaName,
    f: &ReplayFilter,
    to_topic: Option<&str>,
    producer: &Producer,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<ReplayReport> {
    if let Some(t) = to_topic {
        outbox::validate::topic(t).map_err(|e| anyhow::anyhow!("--to-topic: {}", e.reason))?;
    }
    let sql = format!(
        "SELECT {ARCHIVE_COLS} FROM {} WHERE {} AND id > $5 ORDER BY id LIMIT 1000",
        schema.table("archive"),
        replay_where()
    );
    let extra = [("outbox.replayed".to_owned(), "true".to_owned())];
    let mut report = ReplayReport::default();
    let mut after = 0i64;
    loop {
        let page: Vec<ClaimedEvent> = sqlx::query_as(&sql)
            .bind(f.since)
            .bind(f.until)
            .bind(&f.key)
            .bind(&f.topic)
            .bind(after)
            .fetch_all(pool)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let sends = page
            .iter()
            .map(|ev| producer.send_to(to_topic.unwrap_or(&ev.topic), ev, &extra));
        for d in futures::future::join_all(sends).await {
            match d {
                Delivery::Acked { .. } => report.sent += 1,
                other => {
                    report.failed += 1;
                    tracing::warn!("replay delivery failed: {other:?}");
                }
            }
        }
        on_progress(report.sent + report.failed);
    }
    Ok(report)
}

/// A row of `outbox.dead`, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadRow {
    /// Original event row id (kept on redrive, so the key's order is restored).
    pub id: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: String,
    /// Why it died.
    pub reason: String,
    /// Last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// Whether its key is parked.
    pub parked: bool,
    /// When it died.
    pub failed_at: DateTime<Utc>,
}

/// Which dead events a command applies to.
#[derive(Debug, Clone, Default)]
pub struct DeadSelector {
    /// One event.
    pub event_id: Option<Uuid>,
    /// Events of one key.
    pub key: Option<String>,
    /// Events of one topic.
    pub topic: Option<String>,
}

impl DeadSelector {
    /// The dead events of one key.
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            ..Self::default()
        }
    }

    fn sql(&self) -> &'static str {
        "($1::uuid IS NULL OR event_id = $1) AND ($2::text IS NULL OR key = $2) AND ($3::text IS NULL OR topic = $3)"
    }
}

/// Lists dead events, oldest first.
pub async fn dead_list(
    pool: &PgPool,
    schema: &SchemaName,
    sel: &DeadSelector,
    limit: i64,
) -> Result<Vec<DeadRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT id, event_id, topic, key, reason, error, attempts, parked, failed_at FROM {} WHERE {} ORDER BY id LIMIT $4",
        schema.table("dead"),
        sel.sql()
    ))
    .bind(sel.event_id)
    .bind(&sel.key)
    .bind(&sel.topic)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Moves selected dead events back into `events` with their original ids (so they go before later events
/// of their key), attempts reset. Their keys unpark. Returns how many moved.
pub async fn dead_redrive(
    pool: &PgPool,
    schema: &SchemaName,
    sel: &DeadSelector,
) -> Result<u64, sqlx::Error> {
    let cols = "id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, created_at";
    let r = sqlx::query(&format!(
        "WITH d AS (DELETE FROM {} WHERE {} RETURNING *) \
         INSERT INTO {} ({cols}, attempts, next_attempt_at, last_error) \
         SELECT {cols}, 0, now(), 'redriven after: ' || error FROM d",
        schema.table("dead"),
        sel.sql(),
        schema.table("events"),
    ))
    .bind(sel.event_id)
    .bind(&sel.key)
    .bind(&sel.topic)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Deletes selected dead events for good (their keys unpark). Returns how many.
pub async fn dead_discard(
    pool: &PgPool,
    schema: &SchemaName,
    sel: &DeadSelector,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(&format!(
        "DELETE FROM {} WHERE {}",
        schema.table("dead"),
        sel.sql()
    ))
    .bind(sel.event_id)
    .bind(&sel.key)
    .bind(&sel.topic)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
