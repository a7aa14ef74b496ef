use std::fmt;

use sqlx::{Executor, PgPool};

use crate::{Error, ValidationError};

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "outbox";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A validated PostgreSQL schema name (`[a-z_][a-z0-9_]*`, at most 63 bytes), safe to splice into SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, ValidationError> {
        let ok_first = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let ok_rest = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_first || !ok_rest || name.len() > 63 {
            return Err(ValidationError {
                field: "schema".into(),
                reason: format!("{name:?} must match [a-z_][a-z0-9_]* and be at most 63 bytes"),
            });
        }
        Ok(Self(name.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"schema".table`, for building statements.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self(DEFAULT_SCHEMA.into())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The LISTEN/NOTIFY channel the optional trigger signals on for `schema`.
pub fn notify_channel(schema: &SchemaName) -> String {
    format!("{}_events", schema.as_str())
}

/// Creates the schema if needed and applies the embedded migrations to it. Idempotent.
///
/// Migrations are written with unqualified names and run with `search_path` set to the schema, so each
/// schema keeps its own `_sqlx_migrations` history. The connection is closed afterwards rather than returned
/// to the pool with a changed `search_path`.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), Error> {
    let schema = SchemaName::new(schema)?;
    migrate_schema(pool, &schema, &MIGRATOR).await?;
    Ok(())
}

/// Runs `migrator` inside `schema` (created if missing) with `search_path` set to it, so each schema keeps
/// its own history. Processes starting together (several consumers, relays) are serialized by an
/// advisory lock: `CREATE SCHEMA IF NOT EXISTS` alone is not safe against a concurrent twin.
pub async fn migrate_schema(
    pool: &PgPool,
    schema: &SchemaName,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?.detach();
    conn.execute("SELECT pg_advisory_lock(hashtext('outbox-operator:migrate'))")
        .await?;
    conn.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
        .await?;
    conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
        .await?;
    // The connection is closed (not returned to a pool) afterwards: that releases the lock and drops the
    // changed search_path.
    migrator.run(&mut conn).await
}

/// Installs the statement-level NOTIFY trigger that wakes relays on insert. Idempotent.
///
/// Optional because NOTIFY takes a database-wide lock at commit; very busy writers may prefer polling.
pub async fn install_notify_trigger(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    // Relays of one Deployment start together, and restart while others write: installers queue on an
    // advisory lock (two DROP IF EXISTS + CREATE raced: the second CREATE failed), and an installed trigger
    // is left alone — DDL on the hot events table at every start deadlocked with running claims (seen in
    // the chaos soak).
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{}.events_notify", schema.as_str()))
        .execute(&mut *tx)
        .await?;
    let installed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'events_notify' AND tgrelid = $1::regclass)",
    )
    .bind(schema.table("events"))
    .fetch_one(&mut *tx)
    .await?;
    if !installed {
        tx.execute(
            format!(
                "CREATE TRIGGER events_notify AFTER INSERT ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()",
                schema.table("events"),
                schema.table("notify_relay")
            )
            .as_str(),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Removes the NOTIFY trigger. Idempotent.
pub async fn remove_notify_trigger(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    pool.execute(
        format!(
            "DROP TRIGGER IF EXISTS events_notify ON {}",
            schema.table("events")
        )
        .as_str(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(SchemaName::new("outbox").is_ok());
        assert!(SchemaName::new("_x1").is_ok());
        for bad in ["", "1a", "Outbox", "a-b", "a\"b", &"a".repeat(64)] {
            assert_eq!(SchemaName::new(bad).unwrap_err().field, "schema", "{bad:?}");
        }
        assert_eq!(SchemaName::default().table("events"), "\"outbox\".events");
    }
}
