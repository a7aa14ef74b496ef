//! The outbox relay: claims committed events from PostgreSQL, produces them to Kafka with an idempotent
//! producer, and settles them (delete/archive, retry with backoff, dead-letter) in the claim transaction.
//!
//! Layout: [`plan`] decides (pure), [`store`] and [`producer`] do the IO, [`relay`] runs the loop,
//! [`coordinator`] gates it, [`retention`] and [`tools`] are the maintenance side, [`cli`] the binary.

pub mod cli;
pub mod coordinator;
pub mod event;
pub mod health;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod producer;
pub mod relay;
pub mod retention;
pub mod store;
pub mod tools;

pub use relay::{Relay, RelayConfig};
