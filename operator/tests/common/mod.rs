//! Shared by the operator's tests and the RSS example: a kube-fake-client that knows both CRDs.
#![allow(dead_code)]

use kube_fake_client::ClientBuilder;
use operator::crd::{ConsumerGroup, OutboxRelay};

/// `builder` with OutboxRelay and ConsumerGroup registered, each with its status subresource.
pub fn with_crds(builder: ClientBuilder) -> ClientBuilder {
    builder
        .with_resource::<OutboxRelay>()
        .with_resource::<ConsumerGroup>()
        .with_status_subresource::<OutboxRelay>()
        .with_status_subresource::<ConsumerGroup>()
}
