//! The outbox operator: `OutboxRelay` and `ConsumerGroup` custom resources (group `outbox.dev`, version
//! `v1alpha1`, category `outbox`). This part holds the CRD types and their generated YAML; the
//! reconcilers build on them.

pub mod crd;
