//! What the operator and the processes it runs agree on, in one place so that neither side can change it
//! alone: [`crd`] — the `outbox.dev/v1alpha1` custom resources (spec and status types, group/version/kind,
//! the generated CRD files) — and [`env`] — the environment variables the operator sets on relay and
//! consumer pods and the values it renders into them — and [`kafka_guard`] — the librdkafka properties
//! the guarantees rest on, which neither `--kafka-config` nor `configSecretRef` may set.
//!
//! Who writes which status field is [`status`]: a type per writer (and ARCHITECTURE.md, "Who writes which
//! status field").

#[cfg(feature = "crd")]
pub mod crd;
pub mod env;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod kafka_guard;
#[cfg(feature = "crd")]
pub mod status;
