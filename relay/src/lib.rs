//! The outbox relay: claims committed events from PostgreSQL, produces them to Kafka with an idempotent
//! producer, and settles them (delete/archive, retry with backoff, dead-letter) in the claim transaction.
//!
//! Layout: [`decide`] decides (pure), [`store`] and [`producer`] do the IO, [`relay`] runs the loop over the [`pipeline`] of batches in flight,
//! [`coordinator`] gates it ([`kube_lease`] adapts the `lease-election` crate: the Kubernetes Lease mode with the fence), [`retention`] and [`tools`] are the maintenance side, [`cli`] the binary.

pub mod cli;
pub mod coordinator;
pub mod decide;
pub mod event;
pub mod health;
pub mod http;
pub mod kube_lease;
pub mod metrics;
pub mod pipeline;
pub mod producer;
pub mod relay;
pub mod retention;
pub mod status;
pub mod store;
pub mod tools;

pub use relay::{Relay, RelayConfig};
