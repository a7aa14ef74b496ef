//! Delivery receipts: what happened to one event, from the outbox tables and the consumers' inbox.

use chrono::{DateTime, Utc};
use outbox::SchemaName;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Written, not yet acknowledged by Kafka.
    Pending,
    /// Acknowledged by Kafka (archived, or already seen by a consumer).
    Published,
    /// Gave up: in `outbox.dead`.
    Dead,
}

/// The Kafka record the relay published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// When Kafka acknowledged it.
    pub published_at: DateTime<Utc>,
}

/// One consumer group's receipt (its inbox row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consumed {
    /// Consumer group.
    pub group: String,
    /// When its effects committed.
    pub processed_at: DateTime<Utc>,
    /// Partition it was read from.
    pub partition: i32,
    /// Offset it was read at.
    pub offset: i64,
}

/// Why an event is dead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dead {
    /// Short reason.
    pub reason: String,
    /// The last error.
    pub error: String,
    /// When it was given up.
    pub failed_at: DateTime<Utc>,
}

/// `GET /events/{event_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    /// The event.
    pub event_id: Uuid,
    /// Where it is.
    pub status: Status,
    /// When it was written (committed with the business data), when known.
    pub written_at: Option<DateTime<Utc>>,
    /// Failed delivery attempts while pending.
    pub attempts: i32,
    /// The last delivery error while pending.
    pub last_error: Option<String>,
    /// The Kafka record, when the relay archives delivered events.
    pub published: Option<Published>,
    /// Why it was given up.
    pub dead: Option<Dead>,
    /// Consumer groups that processed it, first first.
    pub consumed_by: Vec<Consumed>,
}

/// The tables a receipt is read from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Outbox schema.
    pub outbox: SchemaName,
    /// Inbox schema (may not exist in this database: then nobody consumed here).
    pub inbox: SchemaName,
    /// Orders table, for the write time of delivered, unarchived order events.
    pub orders: String,
}

/// created_at, topic, partition, offset, published_at of an archived event.
type ArchivedRow = (DateTime<Utc>, String, i32, i64, DateTime<Utc>);

fn undefined_table(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "42P01")
}

/// Reads the receipt of `event_id`; `None` when no table knows it.
pub async fn receipt(
    pool: &PgPool,
    src: &Sources,
    event_id: Uuid,
) -> Result<Option<Receipt>, sqlx::Error> {
    let pending: Option<(DateTime<Utc>, i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT created_at, attempts, last_error FROM {} WHERE event_id = $1",
        src.outbox.table("events")
    ))
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    let archived: Option<ArchivedRow> = sqlx::query_as(&format!(
        "SELECT created_at, topic, kafka_partition, kafka_offset, published_at FROM {} \
         WHERE event_id = $1 ORDER BY published_at LIMIT 1",
        src.outbox.table("archive")
    ))
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    let dead: Option<(DateTime<Utc>, String, String, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT created_at, reason, error, failed_at FROM {} WHERE event_id = $1",
        src.outbox.table("dead")
    ))
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    let consumed: Vec<(String, DateTime<Utc>, i32, i64)> = match sqlx::query_as(&format!(
        "SELECT group_id, processed_at, \"partition\", \"offset\" FROM {} WHERE event_id = $1 ORDER BY processed_at",
        src.inbox.table("inbox")
    ))
    .bind(event_id)
    .fetch_all(pool)
    .await
    {
        Err(e) if undefined_table(&e) => vec![],
        r => r?,
    };
    let ordered: Option<DateTime<Utc>> = match sqlx::query_scalar(&format!(
        "SELECT created_at FROM {} WHERE event_id = $1",
        src.orders
    ))
    .bind(event_id)
    .fetch_optional(pool)
    .await
    {
        Err(e) if undefined_table(&e) => None,
        r => r?,
    };
    let status = if dead.is_some() {
        Status::Dead
    } else if pending.is_some() {
        Status::Pending
    } else if archived.is_some() || !consumed.is_empty() || ordered.is_some() {
        Status::Published
    } else {
        return Ok(None);
    };
    let written_at = pending
        .as_ref()
        .map(|p| p.0)
        .or(archived.as_ref().map(|a| a.0))
        .or(dead.as_ref().map(|d| d.0))
        .or(ordered);
    Ok(Some(Receipt {
        event_id,
        status,
        written_at,
        attempts: pending.as_ref().map_or(0, |p| p.1),
        last_error: pending.and_then(|p| p.2),
        published: archived.map(|(_, topic, partition, offset, published_at)| Published {
            topic,
            partition,
            offset,
            published_at,
        }),
        dead: dead.map(|(_, reason, error, failed_at)| Dead {
            reason,
            error,
            failed_at,
        }),
        consumed_by: consumed
            .into_iter()
            .map(|(group, processed_at, partition, offset)| Consumed {
                group,
                processed_at,
                partition,
                offset,
            })
            .collect(),
    }))
}
