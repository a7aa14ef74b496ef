//! The relay's SQL: claim, fence check, settle, statistics. One struct per schema with its statements
//! built once.

use std::time::Duration;

use outbox::SchemaName;
use sqlx::{PgPool, Postgres, Transaction};

use crate::decide::Settle;
use crate::event::ClaimedEvent;

/// What the relay does with delivered rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Delete delivered rows (default).
    Delete,
    /// Move delivered rows to the day-partitioned archive, kept `ttl_days` days.
    Archive {
        /// Days an archived event is kept before its partition is dropped.
        ttl_days: u32,
    },
}

/// The fencing check failed: another holder has a newer epoch, so this relay must not commit.
#[derive(Debug, thiserror::Error)]
#[error("fenced: scope `{scope}` is at epoch {current:?}, this relay holds {mine}")]
pub struct Fenced {
    /// Fence scope.
    pub scope: String,
    /// This relay's epoch.
    pub mine: i64,
    /// The epoch in the table (None: no row).
    pub current: Option<i64>,
}

/// Errors of a claim transaction.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Lost the fence: stop publishing.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// Database error.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A batch's delivery reports did not all arrive by the producer's deadline: the Kafka client is
    /// stuck (seen with librdkafka after a run of delivery timeouts under idempotence). The batches in
    /// flight roll back and the process exits, so a fresh client publishes them.
    #[error("kafka producer stuck: delivery reports missing after {0:?}")]
    ProducerStuck(Duration),
}

/// Snapshot of the pending table for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Pending events.
    pub pending: i64,
    /// Age of the oldest pending event, seconds (0 when none).
    pub oldest_age_seconds: f64,
    /// Pending events that failed at least once (in backoff or due again).
    pub retrying: i64,
    /// Rows in `outbox.dead`.
    pub dead: i64,
}

/// SQL for one outbox schema.
#[derive(Debug, Clone)]
pub struct Store {
    schema: SchemaName,
    claim_sql: String,
    fence_check_sql: String,
    delete_sql: String,
    archive_sql: String,
    retry_sql: String,
    dead_sql: String,
}

impl Store {
    /// Statements for `schema`.
    pub fn new(schema: SchemaName) -> Self {
        let events = schema.table("events");
        let dead = schema.table("dead");
        let archive = schema.table("archive");
        let cols = "id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, created_at, attempts";
        Self {
            // A key never overtakes its head: skip keys with an earlier event in backoff or parked in dead.
            // A claim above the batches in flight ($2 > 0) cannot reach an earlier event at or below $2, so
            // a key with one that failed before waits for the next claim from the start.
            claim_sql: format!(
                "SELECT {cols} FROM {events} e WHERE e.next_attempt_at <= now() \
                 AND NOT EXISTS (SELECT 1 FROM {events} p WHERE p.attempts > 0 AND p.topic = e.topic \
                     AND p.key = e.key AND p.id < e.id AND (p.next_attempt_at > now() OR p.id <= $2)) \
                 AND NOT EXISTS (SELECT 1 FROM {dead} d WHERE d.parked AND d.topic = e.topic AND d.key = e.key) \
                 AND e.id > $2 ORDER BY e.id LIMIT $1 FOR UPDATE OF e SKIP LOCKED"
            ),
            // FOR SHARE: a new holder's epoch bump waits for this transaction, so no stale commit can
            // interleave with the new holder's claims.
            fence_check_sql: format!("SELECT epoch FROM {} WHERE scope = $1 FOR SHARE", schema.table("fence")),
            delete_sql: format!("DELETE FROM {events} WHERE id = ANY($1)"),
            archive_sql: format!(
                "WITH d AS (DELETE FROM {events} e USING UNNEST($1::bigint[], $2::int[], $3::bigint[]) AS u(id, part, off) \
                   WHERE e.id = u.id RETURNING e.*, u.part, u.off) \
                 INSERT INTO {archive} ({cols}, published_at, kafka_partition, kafka_offset) \
                 SELECT {cols}, now(), part, off FROM d"
            ),
            // clock_timestamp(), not now(): now() is the claim transaction's start, which can be a whole
            // delivery timeout ago, and the backoff would already have elapsed.
            retry_sql: format!(
                "UPDATE {events} e SET attempts = e.attempts + 1, last_error = u.err, \
                   next_attempt_at = clock_timestamp() + u.delay_ms * interval '1 millisecond' \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS u(id, delay_ms, err) WHERE e.id = u.id"
            ),
            dead_sql: format!(
                "WITH d AS (DELETE FROM {events} e USING UNNEST($1::bigint[], $2::text[], $3::text[], $4::bool[]) \
                   AS u(id, reason, err, parked) WHERE e.id = u.id RETURNING e.*, u.reason, u.err, u.parked) \
                 INSERT INTO {dead} (id, event_id, topic, key, payload, headers, event_type, aggregate_type, \
                   aggregate_id, created_at, attempts, reason, error, parked) \
                 SELECT id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, \
                   created_at, attempts + 1, reason, err, parked FROM d"
            ),
            schema,
        }
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Verifies that `epoch` still holds the fence of `scope`, locking the row for this transaction.
    pub async fn check_fence(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        scope: &str,
        epoch: i64,
    ) -> Result<(), StoreError> {
        let current: Option<i64> = sqlx::query_scalar(&self.fence_check_sql)
            .bind(scope)
            .fetch_optional(&mut **tx)
            .await?;
        if current != Some(epoch) {
            return Err(Fenced {
                scope: scope.into(),
                mine: epoch,
                current,
            }
            .into());
        }
        Ok(())
    }

    /// Claims up to `limit` due events in id order above `after` (0: from the start), locking them.
    pub async fn claim(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        limit: i64,
        after: i64,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        Ok(sqlx::query_as(&self.claim_sql)
            .bind(limit)
            .bind(after)
            .fetch_all(&mut **tx)
            .await?)
    }

    /// Applies a settle plan in the claim transaction.
    pub async fn settle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        actions: &[Settle],
        retention: Retention,
    ) -> Result<(), StoreError> {
        let (mut ids, mut parts, mut offs) = (vec![], vec![], vec![]);
        let (mut r_ids, mut r_delays, mut r_errs) = (vec![], vec![], vec![]);
        let (mut d_ids, mut d_reasons, mut d_errs, mut d_parked) = (vec![], vec![], vec![], vec![]);
        for a in actions {
            match a {
                Settle::Delivered {
                    id,
                    partition,
                    offset,
                } => {
                    ids.push(*id);
                    parts.push(*partition);
                    offs.push(*offset);
                }
                Settle::Retry { id, delay, error } => {
                    r_ids.push(*id);
                    r_delays.push(delay.as_millis() as i64);
                    r_errs.push(error.clone());
                }
                Settle::Dead {
                    id,
                    reason,
                    error,
                    parked,
                } => {
                    d_ids.push(*id);
                    d_reasons.push(reason.as_str().to_owned());
                    d_errs.push(error.clone());
                    d_parked.push(*parked);
                }
            }
        }
        if !ids.is_empty() {
            match retention {
                Retention::Delete => {
                    sqlx::query(&self.delete_sql)
                        .bind(&ids)
                        .execute(&mut **tx)
                        .await?
                }
                Retention::Archive { .. } => {
                    sqlx::query(&self.archive_sql)
                        .bind(&ids)
                        .bind(&parts)
                        .bind(&offs)
                        .execute(&mut **tx)
                        .await?
                }
            };
        }
        if !r_ids.is_empty() {
            sqlx::query(&self.retry_sql)
                .bind(&r_ids)
                .bind(&r_delays)
                .bind(&r_errs)
                .execute(&mut **tx)
                .await?;
        }
        if !d_ids.is_empty() {
            sqlx::query(&self.dead_sql)
                .bind(&d_ids)
                .bind(&d_reasons)
                .bind(&d_errs)
                .bind(&d_parked)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Backlog figures for metrics.
    pub async fn backlog(&self, pool: &PgPool) -> Result<Backlog, sqlx::Error> {
        let (pending, age, retrying): (i64, Option<f64>, i64) = sqlx::query_as(&format!(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8, count(*) FILTER (WHERE attempts > 0) FROM {}",
            self.schema.table("events")
        ))
        .fetch_one(pool)
        .await?;
        let dead: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            self.schema.table("dead")
        ))
        .fetch_one(pool)
        .await?;
        Ok(Backlog {
            pending,
            oldest_age_seconds: age.unwrap_or(0.0).max(0.0),
            retrying,
            dead,
        })
    }

    /// The epoch stored for `scope`, if any.
    pub async fn fence_epoch(
        &self,
        pool: &PgPool,
        scope: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        let sql = format!(
            "SELECT epoch FROM {} WHERE scope = $1",
            self.schema.table("fence")
        );
        sqlx::query_scalar(&sql)
            .bind(scope)
            .fetch_optional(pool)
            .await
    }

    /// Takes the fence of `scope` for `holder`: with `Some(epoch)` sets it to that epoch (it must be newer
    /// than the stored one), with `None` increments it. Returns the epoch now held, or `None` when the
    /// stored epoch is already newer (another holder won). Waits at most `lock_timeout` for the row: an old
    /// holder's open claim transaction keeps it share-locked until that transaction ends.
    pub async fn take_fence(
        &self,
        pool: &PgPool,
        scope: &str,
        holder: &str,
        epoch: Option<i64>,
        lock_timeout: Duration,
    ) -> Result<Option<i64>, sqlx::Error> {
        let fence = self.schema.table("fence");
        let sql = format!(
            "INSERT INTO {fence} AS f (scope, epoch, holder) VALUES ($1, COALESCE($3, 1), $2) \
             ON CONFLICT (scope) DO UPDATE SET epoch = COALESCE($3, f.epoch + 1), holder = $2, updated_at = now() \
             WHERE $3 IS NULL OR f.epoch < $3 RETURNING epoch"
        );
        let mut tx = pool.begin().await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            lock_timeout.as_millis().max(1)
        ))
        .execute(&mut *tx)
        .await?;
        let got: Option<i64> = sqlx::query_scalar(&sql)
            .bind(scope)
            .bind(holder)
            .bind(epoch)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(got)
    }
}

/// `idle_in_transaction_session_timeout` for relay sessions: a relay paused mid-batch loses its claim
/// (and its fence share lock) instead of blocking a new leader forever.
pub fn idle_in_transaction_timeout(delivery_timeout: Duration) -> Duration {
    delivery_timeout + Duration::from_secs(30)
}
