//! Idempotent Kafka consumers for events from the outbox.
//!
//! For each record: begin a transaction, insert the inbox row `(group_id, event_id)` (`ON CONFLICT DO
//! NOTHING`), and only if it is new run the [`Handler`] in the same transaction; commit; then store the
//! offset. A redelivered event finds its inbox row and is skipped, so effects happen once. Records of one
//! partition that arrive together share a transaction. Retriable failures pause the partition and retry
//! with backoff; permanent ones, undecodable records and exhausted retries go to `<topic>.dlq` with
//! `dlq.*` headers before the offset moves.

pub mod cli;
pub mod continuity;
pub mod decide;
pub mod health;
pub mod inbox;
pub mod membership;
pub mod message;
pub mod metrics;
mod runtime;

pub use decide::{HandlerError, RetryPolicy};
pub use message::Message;
pub use runtime::{CommitObserver, Handler, Runtime, RuntimeConfig};
