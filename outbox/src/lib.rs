//! The transactional outbox for PostgreSQL.
//!
//! Applications call [`publish`] (or [`Outbox::publish`]) inside the same `sqlx` transaction that writes
//! their business data; the event commits or rolls back with it. A relay (`outbox-relay`) later moves
//! committed events to Kafka. Every event gets a UUID v7 `event_id` at write time, which consumers use to
//! remove duplicates.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
//! outbox::migrate(&pool, outbox::DEFAULT_SCHEMA).await?;
//! let mut tx = pool.begin().await?;
//! // ... write business rows with &mut *tx ...
//! let event = outbox::NewEvent::new("orders", "order-42")
//!     .json(&serde_json::json!({"id": 42}))?
//!     .event_type("OrderCreated")
//!     .aggregate("order", "42");
//! let event_id = outbox::publish(&mut tx, event).await?;
//! tx.commit().await?;
//! # let _ = event_id; Ok(()) }
//! ```

mod error;
mod event;
mod publish;
mod schema;
mod trace;
pub mod validate;

pub use error::Error;
pub use event::NewEvent;
pub use publish::{publish, publish_all, Outbox, DEFAULT_MAX_PAYLOAD_BYTES};
pub use schema::{
    install_notify_trigger, migrate, migrate_schema, notify_channel, remove_notify_trigger,
    SchemaName, DEFAULT_SCHEMA,
};
pub use trace::parse_traceparent;
pub use validate::ValidationError;
