use crate::validate::ValidationError;

/// Everything that can go wrong when writing to the outbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event is invalid; nothing was written.
    #[error("invalid event: {0}")]
    Invalid(#[from] ValidationError),
    /// The payload could not be serialised to JSON.
    #[error("field `payload`: cannot serialise to JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A database error (the caller's transaction should be rolled back).
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Running the schema migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
