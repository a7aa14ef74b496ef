//! The outbox operator: `OutboxRelay` and `ConsumerGroup` custom resources (group `outbox.dev`, version
//! `v1alpha1`, category `outbox`) become Deployments of relays and consumers, and Kafka topics.
//!
//! Layout: [`crd`] the types (from the `contract` crate), [`plan`], [`connection`], [`topics`] and [`autoscale`] decide (pure),
//! [`conditions`] computes kstatus,
//! [`reconcile`] does the IO (server-side apply, topic admin, status), [`metrics`] counts, [`cli`] runs.

pub mod autoscale;
pub mod cli;
pub mod conditions;
pub mod connection;
/// The CRD types live in the `contract` crate (shared with the relay and the tests); re-exported here.
pub use contract::crd;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod topics;
