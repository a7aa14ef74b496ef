//! The process interface: every environment variable the operator sets on the pods it runs, named once.
//! The operator renders them (`operator::plan`), the relay's and the consumer runtime's clap definitions
//! read them (`env = contract::env::…`), and `tests/tests/contract.rs` feeds the rendered environment of
//! every example to those parsers. Values are rendered from the CRD types ([`crate::crd`]'s `env_value`).
//!
//! The TLS and SASL variables ([`security`]) are read by the shared security flags in
//! `process_kit::security`, which every process links.

/// Read by every process the operator runs.
pub mod common {
    /// PostgreSQL URL (from the resource's Secret).
    pub const DATABASE_URL: &str = "DATABASE_URL";
    /// Kafka bootstrap servers.
    pub const KAFKA_BOOTSTRAP: &str = "KAFKA_BOOTSTRAP";
    /// `text` or `json`; the operator sets `json`.
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    /// The pod's name (downward API).
    pub const POD_NAME: &str = "POD_NAME";
    /// The pod's namespace (downward API).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
}

/// TLS and SASL: the files the operator mounts from Secrets and the settings that use them. Read by
/// `process_kit::security` (every process).
pub mod security {
    /// CA bundle for PostgreSQL's server certificate.
    pub const DATABASE_CA_FILE: &str = "DATABASE_CA_FILE";
    /// Client certificate for PostgreSQL.
    pub const DATABASE_CERT_FILE: &str = "DATABASE_CERT_FILE";
    /// Client key for PostgreSQL.
    pub const DATABASE_KEY_FILE: &str = "DATABASE_KEY_FILE";
    /// `true`: connect to the brokers over TLS.
    pub const KAFKA_TLS: &str = "KAFKA_TLS";
    /// CA files for the brokers' certificates, comma-separated.
    pub const KAFKA_CA_FILE: &str = "KAFKA_CA_FILE";
    /// Client certificate for mutual TLS.
    pub const KAFKA_CERT_FILE: &str = "KAFKA_CERT_FILE";
    /// Client key for mutual TLS.
    pub const KAFKA_KEY_FILE: &str = "KAFKA_KEY_FILE";
    /// `plain`, `scram-sha-256` or `scram-sha-512` (`crate::crd::KafkaAuthenticationType::env_value`).
    pub const KAFKA_SASL_MECHANISM: &str = "KAFKA_SASL_MECHANISM";
    /// SASL username.
    pub const KAFKA_SASL_USERNAME: &str = "KAFKA_SASL_USERNAME";
    /// File holding the SASL password.
    pub const KAFKA_SASL_PASSWORD_FILE: &str = "KAFKA_SASL_PASSWORD_FILE";
}

/// Read by `outbox-relay run`.
pub mod relay {
    /// Outbox schema.
    pub const OUTBOX_SCHEMA: &str = "OUTBOX_SCHEMA";
    /// Extra librdkafka properties.
    pub const KAFKA_CONFIG: &str = "RELAY_KAFKA_CONFIG";
    /// `single`, `lease` or `competing` ([`crate::crd::CoordinationMode::env_value`]).
    pub const COORDINATION: &str = "RELAY_COORDINATION";
    /// Lease name (lease mode).
    pub const LEASE_NAME: &str = "RELAY_LEASE_NAME";
    /// Lease duration, e.g. `15s`.
    pub const LEASE_DURATION: &str = "RELAY_LEASE_DURATION";
    /// Renew deadline, e.g. `10s`.
    pub const RENEW_DEADLINE: &str = "RELAY_RENEW_DEADLINE";
    /// Retry period, e.g. `2s`.
    pub const RETRY_PERIOD: &str = "RELAY_RETRY_PERIOD";
    /// Fencing scope shared by the relays of one outbox.
    pub const FENCE_SCOPE: &str = "RELAY_FENCE_SCOPE";
    /// The OutboxRelay whose `backlog` and `oldestPendingAgeSeconds` the leader reports.
    pub const STATUS_RESOURCE: &str = "RELAY_STATUS_RESOURCE";
    /// `true`: a healthy standby is Ready.
    pub const STANDBY_READY: &str = "RELAY_STANDBY_READY";
    /// Events per claim transaction.
    pub const BATCH_SIZE: &str = "RELAY_BATCH_SIZE";
    /// Batches in flight.
    pub const IN_FLIGHT_BATCHES: &str = "RELAY_IN_FLIGHT_BATCHES";
    /// Poll interval when drained, e.g. `500ms`.
    pub const POLL_INTERVAL: &str = "RELAY_POLL_INTERVAL";
    /// Attempts before an event is dead.
    pub const MAX_ATTEMPTS: &str = "RELAY_MAX_ATTEMPTS";
    /// `park-key` or `skip` ([`crate::crd::PoisonPolicy::env_value`]).
    pub const POISON: &str = "RELAY_POISON";
    /// `true`: dead events also go to `<topic>.dlq`.
    pub const DLQ: &str = "RELAY_DLQ";
    /// `delete` or `archive` ([`crate::crd::Retention::env_value`]).
    pub const RETENTION: &str = "RELAY_RETENTION";
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    pub const HTTP_ADDR: &str = "RELAY_HTTP_ADDR";
}

/// Read by every consumer built on `consumer_runtime::cli::ConsumerArgs`.
pub mod consumer {
    /// Consumer group id.
    pub const GROUP_ID: &str = "CONSUMER_GROUP_ID";
    /// Topics, comma-separated.
    pub const TOPICS: &str = "CONSUMER_TOPICS";
    /// Schema of the inbox table.
    pub const INBOX_SCHEMA: &str = "CONSUMER_INBOX_SCHEMA";
    /// Extra librdkafka properties.
    pub const KAFKA_CONFIG: &str = "CONSUMER_KAFKA_CONFIG";
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    pub const HTTP_ADDR: &str = "CONSUMER_HTTP_ADDR";
    /// Instance name (the pod's name).
    pub const INSTANCE_ID: &str = "CONSUMER_INSTANCE_ID";
}
