use std::collections::BTreeMap;

use serde::Serialize;

use crate::Error;

/// An event to write into the outbox. Built with [`NewEvent::new`] and the chained setters; validated
/// when published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Kafka topic the relay publishes to.
    pub topic: String,
    /// Kafka record key: the ordering unit (events of one topic and key are delivered in write order).
    pub key: String,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers (a `traceparent` is added at publish time when a trace context is active).
    pub headers: BTreeMap<String, String>,
    /// Optional event type, e.g. `OrderCreated` (sent as header `event_type`).
    pub event_type: Option<String>,
    /// Optional aggregate type, e.g. `order`.
    pub aggregate_type: Option<String>,
    /// Optional aggregate id.
    pub aggregate_id: Option<String>,
}

impl NewEvent {
    /// A new event with an empty payload.
    pub fn new(topic: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            key: key.into(),
            payload: Vec::new(),
            headers: BTreeMap::new(),
            event_type: None,
            aggregate_type: None,
            aggregate_id: None,
        }
    }

    /// Sets the payload to raw bytes.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.payload = bytes.into();
        self
    }

    /// Sets the payload to the JSON serialisation of `value` and the `content-type` header accordingly.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Error> {
        self.payload = serde_json::to_vec(value)?;
        self.headers
            .insert("content-type".into(), "application/json".into());
        Ok(self)
    }

    /// Adds (or replaces) a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the event type.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Sets the aggregate type and id.
    pub fn aggregate(
        mut self,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
    ) -> Self {
        self.aggregate_type = Some(aggregate_type.into());
        self.aggregate_id = Some(aggregate_id.into());
        self
    }
}
