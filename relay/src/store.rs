//! The relay's SQL: claim, fence check, settle, statistics. One struct per schema with its statements
//! built once.

use std::time::Duration;

use outbox::SchemaName;
use sqlx::{PgPool, Postgres, Transaction};

use crate::decide::Settle;
pub use crate::decide::{Claim, CLAIM_SCAN_FACTOR};
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

/// A dead row whose copy to `<topic>.dlq` is still due.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DlqDue {
    /// The event as it was claimed.
    #[sqlx(flatten)]
    pub event: ClaimedEvent,
    /// `outbox.dead.reason`.
    pub reason: String,
    /// `outbox.dead.error`.
    pub error: String,
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
            // A key never overtakes its head: an event is claimed only when every earlier pending event of
            // its key is claimed with it. An earlier row holds the key back when it is at or below the
            // claim's start ($2: in hand, committed late, redriven, or left behind by a discard), in hand
            // ($3, needed only by a claim from the start: a record in flight may still time out and must
            // not be overtaken by a later batch), or in backoff — whatever its attempts. Keys parked in
            // dead wait.
            // Shape, for cost: the keys held back are gathered once, one row per key with its lowest
            // holding id, and hash-joined, instead of probing each candidate's earlier rows (that
            // visited the whole backlog when every key was held — hot keys in flight — ~2 s on 200,000
            // rows). Keys that wait for long (`waiting`: a row in backoff, or parked) are skipped whole
            // while the candidates are read, so they never fill the window (`NOT IN`: a hashed filter
            // that keeps the id order; an anti-join made a generic plan sort the whole backlog);
            // keys held by rows in flight or below the start (`flying`, gone within a batch's round
            // trip) are applied to a bounded window of candidates (`cand`, the next $4 due rows not in
            // hand), so a claim that finds every key in flight costs about as much as a productive one.
            // The ids in hand are a set (`hand`), not `<> ALL($3)`: a generic plan scans a parameter
            // array per row. The final lookup is by primary key; its limit comes after `SKIP LOCKED`, so
            // competing relays take the rows after each other's. `decide::claimable` is the same rule.
            claim_sql: format!(
                "WITH hand AS MATERIALIZED (SELECT unnest($3::bigint[]) AS id), \
                 waiting AS MATERIALIZED ( \
                   SELECT topic, key FROM {events} WHERE next_attempt_at > now() \
                   UNION SELECT topic, key FROM {dead} WHERE parked), \
                 flying AS MATERIALIZED ( \
                   SELECT f.topic, f.key, min(f.id) AS first FROM ( \
                     SELECT topic, key, id FROM {events} WHERE id <= $2 \
                     UNION ALL SELECT topic, key, id FROM {events} WHERE id = ANY($3)) f \
                   GROUP BY f.topic, f.key), \
                 cand AS (SELECT w.id, w.topic, w.key FROM {events} w \
                   WHERE w.next_attempt_at <= now() AND w.id > $2 \
                   AND NOT EXISTS (SELECT 1 FROM hand WHERE hand.id = w.id) \
                   AND (w.topic, w.key) NOT IN (SELECT topic, key FROM waiting) \
                   ORDER BY w.id LIMIT $4), \
                 ok AS (SELECT c.id FROM cand c WHERE NOT EXISTS (SELECT 1 FROM flying h \
                   WHERE h.topic = c.topic AND h.key = c.key AND h.first < c.id)) \
                 SELECT {cols} FROM {events} e WHERE e.id = ANY(ARRAY(SELECT id FROM ok)) \
                 ORDER BY e.id LIMIT $1 FOR UPDATE OF e SKIP LOCKED"
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
            // A failure that is the broker's or the network's (`counts` false) leaves `attempts` alone.
            retry_sql: format!(
                "UPDATE {events} e SET attempts = e.attempts + u.counts::int, last_error = u.err, \
                   next_attempt_at = clock_timestamp() + u.delay_ms * interval '1 millisecond' \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bool[]) AS u(id, delay_ms, err, counts) \
                 WHERE e.id = u.id"
            ),
            dead_sql: format!(
                "WITH d AS (DELETE FROM {events} e USING UNNEST($1::bigint[], $2::text[], $3::text[], $4::bool[]) \
                   AS u(id, reason, err, parked) WHERE e.id = u.id RETURNING e.*, u.reason, u.err, u.parked) \
                 INSERT INTO {dead} (id, event_id, topic, key, payload, headers, event_type, aggregate_type, \
                   aggregate_id, created_at, attempts, reason, error, parked, dlq_due) \
                 SELECT id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, \
                   created_at, attempts + 1, reason, err, parked, $5 FROM d"
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

    /// Claims up to `limit` due events in id order, locking them: those above `claim.after` (0: from the
    /// start) whose earlier pending events of the same key are all in this claim (see [`Claim`]), among
    /// the next `limit` x [`CLAIM_SCAN_FACTOR`] due rows not in hand.
    pub async fn claim(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        limit: i64,
        claim: &Claim,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        Ok(sqlx::query_as(&self.claim_sql)
            .bind(limit)
            .bind(claim.after)
            .bind(&claim.in_flight)
            .bind(limit.saturating_mul(CLAIM_SCAN_FACTOR))
            .fetch_all(&mut **tx)
            .await?)
    }

    /// Applies a settle plan in the claim transaction. Dead rows are marked for the DLQ forwarder when
    /// `dlq` is set.
    pub async fn settle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        actions: &[Settle],
        retention: Retention,
        dlq: bool,
    ) -> Result<(), StoreError> {
        let (mut ids, mut parts, mut offs) = (vec![], vec![], vec![]);
        let (mut r_ids, mut r_delays, mut r_errs, mut r_counts) = (vec![], vec![], vec![], vec![]);
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
                Settle::Retry {
                    id,
                    delay,
                    error,
                    counts,
                } => {
                    r_ids.push(*id);
                    r_delays.push(delay.as_millis() as i64);
                    r_errs.push(error.clone());
                    r_counts.push(*counts);
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
                .bind(&r_counts)
                .execute(&mut **tx)
                .await?;
        }
        if !d_ids.is_empty() {
            sqlx::query(&self.dead_sql)
                .bind(&d_ids)
                .bind(&d_reasons)
                .bind(&d_errs)
                .bind(&d_parked)
                .bind(dlq)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Up to `limit` dead rows whose DLQ copy is due, oldest first.
    pub async fn dlq_due(&self, pool: &PgPool, limit: i64) -> Result<Vec<DlqDue>, sqlx::Error> {
        // `attempts` as stored in dead already counts the last one; the DLQ header reports it as is.
        sqlx::query_as(&format!(
            "SELECT id, event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id, \
               created_at, attempts - 1 AS attempts, reason, error FROM {} WHERE dlq_due ORDER BY id LIMIT $1",
            self.schema.table("dead")
        ))
        .bind(limit)
        .fetch_all(pool)
        .await
    }

    /// Marks the DLQ copy of dead row `id` as sent.
    pub async fn dlq_sent(&self, pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET dlq_due = false WHERE id = $1",
            self.schema.table("dead")
        ))
        .bind(id)
        .execute(pool)
        .await?;
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
