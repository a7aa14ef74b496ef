//! The inbox table: deduplication key and delivery receipt, written in the handler's transaction.

use std::collections::HashSet;
use std::time::Duration;

use outbox::SchemaName;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Message;

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "inbox";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates the schema and applies the inbox migrations (own history per schema). Idempotent.
pub async fn migrate(
    pool: &PgPool,
    schema: &SchemaName,
) -> Result<(), sqlx::migrate::MigrateError> {
    outbox::migrate_schema(pool, schema, &MIGRATOR).await
}

/// Inbox statements for one schema.
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: SchemaName,
    record_all_sql: String,
    record_dead_sql: String,
}

impl Inbox {
    /// Statements for `schema`.
    pub fn new(schema: SchemaName) -> Self {
        let record_all_sql = format!(
            "INSERT INTO {} (group_id, event_id, topic, \"partition\", \"offset\") \
             SELECT $1, e, $2, $3, o FROM UNNEST($4::uuid[], $5::bigint[]) AS u(e, o) \
             ON CONFLICT (group_id, event_id) DO NOTHING RETURNING event_id",
            schema.table("inbox")
        );
        let record_dead_sql = format!(
            "INSERT INTO {} (group_id, event_id, topic, \"partition\", \"offset\", outcome) \
             VALUES ($1, $2, $3, $4, $5, 'dead_lettered') ON CONFLICT (group_id, event_id) DO NOTHING",
            schema.table("inbox")
        );
        Self {
            schema,
            record_all_sql,
            record_dead_sql,
        }
    }

    /// Records that `msg` went to the DLQ instead of the handler (after its copy there is durable): a
    /// later copy of the event is then skipped as processed.
    pub async fn record_dead(
        &self,
        pool: &PgPool,
        group: &str,
        msg: &Message,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&self.record_dead_sql)
            .bind(group)
            .bind(msg.event_id)
            .bind(&msg.topic)
            .bind(msg.partition)
            .bind(msg.offset)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Records a run of messages from one partition (one message, or many) in the caller's transaction, in
    /// one statement. Returns the event ids that were new (the others were processed before, or appear
    /// twice in the run).
    pub async fn record_all(
        &self,
        conn: &mut PgConnection,
        group: &str,
        topic: &str,
        partition: i32,
        msgs: &[Message],
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        let ids: Vec<Uuid> = msgs.iter().map(|m| m.event_id).collect();
        let offsets: Vec<i64> = msgs.iter().map(|m| m.offset).collect();
        sqlx::query_scalar(&self.record_all_sql)
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(&ids)
            .bind(&offsets)
            .fetch_all(conn)
            .await
            .map(|v| v.into_iter().collect())
    }

    /// Deletes rows older than `window`, at most `batch` per statement, until none are left. Returns how
    /// many went. Bounded batches keep locks and WAL bursts small.
    pub async fn expire(
        &self,
        pool: &PgPool,
        window: Duration,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE processed_at < now() - $1 * interval '1 second' \
             ORDER BY processed_at LIMIT $2))",
            t = self.schema.table("inbox")
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(window.as_secs_f64())
                .bind(batch)
                .execute(pool)
                .await?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }
}
