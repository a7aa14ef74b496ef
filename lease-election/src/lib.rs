//! Kubernetes Lease leader election with client-go semantics, for the relay (one publisher per outbox,
//! fenced by the Lease's epoch) and the operator (one reconciling replica).
//!
//! [`elector`] decides (pure: no IO, no clock of its own), [`client`] reads and compare-and-swap-writes the
//! `coordination.k8s.io/v1` Lease, [`candidate`] runs rounds until it may lead and then keeps the Lease with
//! a task that reports the loss the instant the renew deadline passes.
//!
//! Written here rather than taken from a crate (ARCHITECTURE.md, "Decisions worth knowing"): the maintained
//! crates either write without compare-and-swap or keep reporting leadership after API errors, and the
//! relay's ordering guarantee depends on exactly the rules [`elector`] documents.

pub mod candidate;
pub mod client;
pub mod elector;

pub use candidate::{Candidate, Held, Observer, Unobserved};
pub use client::LeaseClient;
pub use elector::{Elector, LeaseRecord, Read, Step, Timings, Write, Written};
