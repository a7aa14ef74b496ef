//! The plumbing every process of the product shares — the relay, the consumer runtime, the demo API and the
//! operator — so that each behaves the same way to whoever runs it:
//! [`service`] (one-line configuration errors and exit code 2, logging and trace export, SIGTERM/SIGINT,
//! checked Kafka settings, the database wait), [`surfaces`] (`/healthz`, `/readyz`, `/metrics`),
//! [`security`] (the TLS/SASL flags naming mounted files), [`backoff`] (the one backoff curve) and
//! [`trace_id`] (trace ids in log lines).
//!
//! Feature `database` (sqlx) adds what only processes with a database need; the operator builds without it.

pub mod backoff;
pub mod security;
pub mod service;
pub mod surfaces;
pub mod trace_id;
