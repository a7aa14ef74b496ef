//! Archive retention: day partitions are created ahead of time and dropped whole once expired
//! (never a large DELETE).

use chrono::{Days, NaiveDate};
use outbox::SchemaName;
use sqlx::PgPool;

/// Days of partitions created ahead of today.
pub const AHEAD_DAYS: u64 = 3;

/// Name of the archive partition holding `day` (UTC).
pub fn partition_name(day: NaiveDate) -> String {
    format!("archive_p{}", day.format("%Y%m%d"))
}

fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("archive_p")?, "%Y%m%d").ok()
}

/// What maintenance changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Days whose partition is missing (today and the next [`AHEAD_DAYS`]).
    pub create: Vec<NaiveDate>,
    /// Existing partitions entirely older than the TTL.
    pub drop: Vec<String>,
}

/// Decides which partitions to create and drop. A partition for day `d` holds `[d, d+1)`; it expires
/// when all of it is older than `ttl_days`, i.e. when `d + 1 <= today - ttl_days`.
pub fn plan(today: NaiveDate, ttl_days: u32, existing: &[String]) -> PartitionPlan {
    let cutoff = today - Days::new(ttl_days as u64);
    let mut drop: Vec<String> = existing
        .iter()
        .filter(|n| partition_day(n).is_some_and(|d| d + Days::new(1) <= cutoff))
        .cloned()
        .collect();
    drop.sort();
    let create = (0..=AHEAD_DAYS)
        .map(|i| today + Days::new(i))
        .filter(|d| !existing.contains(&partition_name(*d)))
        .collect();
    PartitionPlan { create, drop }
}

/// Creates missing partitions and drops expired ones. `today` defaults to the database's UTC date.
pub async fn maintain(
    pool: &PgPool,
    schema: &SchemaName,
    ttl_days: u32,
    today: Option<NaiveDate>,
) -> Result<PartitionPlan, sqlx::Error> {
    let today = match today {
        Some(d) => d,
        None => {
            sqlx::query_scalar("SELECT (now() AT TIME ZONE 'UTC')::date")
                .fetch_one(pool)
                .await?
        }
    };
    let existing = partitions(pool, schema).await?;
    let p = plan(today, ttl_days, &existing);
    for day in &p.create {
        let next = *day + Days::new(1);
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')",
            schema.table(&partition_name(*day)),
            schema.table("archive"),
        ))
        .execute(pool)
        .await?;
    }
    for name in &p.drop {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", schema.table(name)))
            .execute(pool)
            .await?;
        tracing::info!("dropped expired archive partition {name}");
    }
    Ok(p)
}

/// Names of the archive's partitions.
pub async fn partitions(pool: &PgPool, schema: &SchemaName) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace \
         WHERE p.relname = 'archive' AND n.nspname = $1 ORDER BY 1",
    )
    .bind(schema.as_str())
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn creates_ahead_and_drops_only_fully_expired_days() {
        let existing: Vec<String> = [
            "archive_p20261110",
            "archive_p20261115",
            "archive_p20261116",
            "archive_p20261123",
            "other",
        ]
        .map(String::from)
        .to_vec();
        let p = plan(d("2026-11-23"), 7, &existing);
        // cutoff 2026-11-16: the 15th ends exactly at the cutoff and goes; the 16th still holds young rows.
        assert_eq!(p.drop, vec!["archive_p20261110", "archive_p20261115"]);
        assert_eq!(
            p.create,
            vec![d("2026-11-24"), d("2026-11-25"), d("2026-11-26")]
        );
    }

    #[test]
    fn zero_ttl_keeps_today() {
        let p = plan(
            d("2026-01-01"),
            0,
            &["archive_p20251231".into(), "archive_p20260101".into()],
        );
        assert_eq!(p.drop, vec!["archive_p20251231"]);
        assert_eq!(p.create.len(), AHEAD_DAYS as usize);
    }
}
