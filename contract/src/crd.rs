//! CRD types. Secrets are only ever referenced, never written into a spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the operator's resources.
pub const GROUP: &str = "outbox.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every resource in this module.
pub const API_VERSION: &str = "outbox.dev/v1alpha1";

/// A key of a Secret in the resource's namespace.
// Plain schema bounds, no CEL: the API server's messages name the field, and a rule on an unbounded string
// costs the CRD's whole CEL budget.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name (a DNS subdomain).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A certificate (PEM) in a Secret of the resource's namespace (Strimzi's `CertSecretSource`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertSecretSource {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key of the certificate in the Secret, e.g. `ca.crt`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub certificate: String,
}

/// A certificate and its private key (PEM) in one Secret (Strimzi's `CertAndKeySecretSource`; a Strimzi
/// KafkaUser's Secret has `user.crt` and `user.key`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertAndKeySecretSource {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key of the certificate, e.g. `user.crt` or `tls.crt`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub certificate: String,
    /// Key of the private key, e.g. `user.key` or `tls.key`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A password in a Secret (Strimzi's `PasswordSecretSource`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PasswordSecretSource {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key of the password in the Secret, e.g. `password`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password: String,
}

/// TLS to PostgreSQL: `sslmode=verify-full` against the given CA, optionally with a client certificate.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseTls {
    /// Secret key holding the CA certificate(s) (PEM) that signed the server's certificate (mounted,
    /// used as `sslrootcert`; the server's certificate must also name the host in the URL).
    pub ca_secret_ref: SecretKeyRef,
    /// Client certificate and key for certificate authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertAndKeySecretSource>,
}

/// Where the outbox lives.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret key holding the `postgres://` URL (with credentials).
    pub secret_ref: SecretKeyRef,
    /// Outbox schema.
    #[serde(default = "default_schema")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub schema: String,
    /// TLS with a private CA (`sslmode=verify-full`); without it the URL's `sslmode` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DatabaseTls>,
}

fn default_schema() -> String {
    "outbox".into()
}

/// Where a consumer group's inbox lives.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxDatabaseSpec {
    /// Secret key holding the `postgres://` URL (with credentials).
    pub secret_ref: SecretKeyRef,
    /// Inbox schema.
    #[serde(default = "default_inbox_schema")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub schema: String,
    /// TLS with a private CA (`sslmode=verify-full`); without it the URL's `sslmode` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DatabaseTls>,
}

fn default_inbox_schema() -> String {
    "inbox".into()
}

/// TLS to the brokers.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTls {
    /// CA certificates the brokers' certificates are checked against (e.g. Strimzi's
    /// `<cluster>-cluster-ca-cert`, key `ca.crt`). Empty: the CA bundle of the image (public CAs, as for
    /// Confluent Cloud or Aiven with a public certificate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub trusted_certificates: Vec<CertSecretSource>,
}

/// How the clients authenticate to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum KafkaAuthenticationType {
    /// Mutual TLS with `certificateAndKey` (needs `kafka.tls`).
    #[serde(rename = "tls")]
    Tls,
    /// SASL SCRAM-SHA-256 with `username` and `passwordSecret`.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// SASL SCRAM-SHA-512 with `username` and `passwordSecret`.
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
    /// SASL PLAIN with `username` and `passwordSecret` (use it with `kafka.tls`).
    #[serde(rename = "plain")]
    Plain,
}

impl KafkaAuthenticationType {
    /// The value of [`crate::env::security::KAFKA_SASL_MECHANISM`] (`--kafka-sasl-mechanism`); `None` for
    /// mutual TLS, which is no SASL mechanism.
    pub fn env_value(self) -> Option<&'static str> {
        match self {
            Self::Tls => None,
            Self::ScramSha256 => Some("scram-sha-256"),
            Self::ScramSha512 => Some("scram-sha-512"),
            Self::Plain => Some("plain"),
        }
    }
}

/// Client authentication, shaped like Strimzi's (`KafkaClientAuthentication*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.type != 'tls' || has(self.certificateAndKey)").message("type tls needs certificateAndKey"),
    validation = Rule::new("self.type == 'tls' || (has(self.username) && has(self.passwordSecret))").message("SASL types (scram-sha-256, scram-sha-512, plain) need username and passwordSecret"),
    validation = Rule::new("self.type == 'tls' ? !has(self.username) && !has(self.passwordSecret) : !has(self.certificateAndKey)").message("certificateAndKey belongs to type tls; username and passwordSecret to the SASL types")
)]
pub struct KafkaAuthentication {
    /// `tls`, `scram-sha-256`, `scram-sha-512` or `plain`.
    #[serde(rename = "type")]
    pub type_: KafkaAuthenticationType,
    /// SASL username (for a Strimzi KafkaUser: its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub username: Option<String>,
    /// SASL password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<PasswordSecretSource>,
    /// Client certificate and key for `type: tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_and_key: Option<CertAndKeySecretSource>,
}

/// Kafka connection.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.authentication) || self.authentication.type != 'tls' || has(self.tls)").message("authentication type tls needs kafka.tls")
)]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port[,host:port]`.
    #[schemars(length(min = 3))]
    pub bootstrap: String,
    /// TLS to the brokers (absent: plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
    /// Client authentication (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<KafkaAuthentication>,
    /// Secret key holding further librdkafka properties, as `key=value,key=value` (for what `tls` and
    /// `authentication` do not cover, e.g. OAUTHBEARER; a property both set is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_secret_ref: Option<SecretKeyRef>,
}

/// Labels and annotations added to the pods.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    /// Pod labels (the operator's `app.kubernetes.io/*` labels cannot be overridden).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Pod annotations, e.g. a service mesh's or Vault's injection (`outbox.dev/*` and `prometheus.io/*`
    /// are the operator's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Pod settings for a platform (Strimzi's `template.pod`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSettings {
    /// Labels and annotations of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// ServiceAccount of the pods (ConsumerGroup only, e.g. for workload identity; a relay runs as the
    /// `<name>-relay` ServiceAccount the operator binds to its Lease Role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub service_account_name: Option<String>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of node taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the pods spread over zones and nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra volumes (names `tmp` and `outbox-*` are the operator's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

/// Container settings (Strimzi's `template.<container>`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerTemplateSettings {
    /// Extra environment (the variables the operator sets from the spec cannot be overridden).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Environment from whole Secrets or ConfigMaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Mounts of `template.pod.volumes` (not on `/tmp` or under `/etc/outbox`, the operator's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// How the operator's pods are customised; the operator's own settings (security context, probes, the
/// environment it sets, its volumes) keep precedence and a conflict is refused naming the field.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// The pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodTemplateSettings>,
    /// The one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerTemplateSettings>,
}

/// How the relays of one outbox coordinate.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
pub enum CoordinationMode {
    /// Kubernetes Lease: one publisher, the others stand by.
    #[default]
    Lease,
    /// PostgreSQL advisory lock: one publisher.
    Single,
    /// Every replica publishes; no order across replicas.
    Competing,
}

impl CoordinationMode {
    /// The value of [`crate::env::relay::COORDINATION`] (the relay's `--coordination`).
    pub fn env_value(self) -> &'static str {
        match self {
            Self::Lease => "lease",
            Self::Single => "single",
            Self::Competing => "competing",
        }
    }
}

/// Coordination settings (client-go timings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.leaseDurationSeconds > self.renewDeadlineSeconds && self.renewDeadlineSeconds > self.retryPeriodSeconds")
        .message("lease duration must exceed the renew deadline, which must exceed the retry period")
)]
pub struct CoordinationSpec {
    /// Mode.
    #[serde(default)]
    pub mode: CoordinationMode,
    /// Lease validity without renewal.
    #[serde(default = "d15")]
    #[schemars(range(min = 2, max = 600))]
    pub lease_duration_seconds: i32,
    /// The holder stops publishing when it could not renew for this long.
    #[serde(default = "d10")]
    #[schemars(range(min = 1, max = 600))]
    pub renew_deadline_seconds: i32,
    /// Pause between attempts.
    #[serde(default = "d2")]
    #[schemars(range(min = 1, max = 600))]
    pub retry_period_seconds: i32,
}

fn d15() -> i32 {
    15
}
fn d10() -> i32 {
    10
}
fn d2() -> i32 {
    2
}

impl Default for CoordinationSpec {
    fn default() -> Self {
        Self {
            mode: CoordinationMode::Lease,
            lease_duration_seconds: 15,
            renew_deadline_seconds: 10,
            retry_period_seconds: 2,
        }
    }
}

/// What later events of a dead-lettered event's key do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
pub enum PoisonPolicy {
    /// The key waits until the dead event is redriven or discarded.
    #[default]
    ParkKey,
    /// The key continues.
    Skip,
}

impl PoisonPolicy {
    /// The value of [`crate::env::relay::POISON`] (the relay's `--poison`).
    pub fn env_value(self) -> &'static str {
        match self {
            Self::ParkKey => "park-key",
            Self::Skip => "skip",
        }
    }
}

/// What happens to delivered rows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
pub enum Retention {
    /// Deleted.
    #[default]
    Delete,
    /// Moved to the archive (day partitions), for replay.
    Archive,
}

impl Retention {
    /// The value of [`crate::env::relay::RETENTION`] (the relay's `--retention`).
    pub fn env_value(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Archive => "archive",
        }
    }
}

/// A relay for one outbox: claim → produce → settle. (`Default` exists for test fakes only; an empty spec
/// fails the schema.)
// Several `printcolumn(...)` entries share keys on purpose; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Default, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    derive = "Default",
    namespaced,
    shortname = "obr",
    category = "outbox",
    status = "OutboxRelayStatus",
    doc = "Moves committed outbox events from PostgreSQL to Kafka",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    cel
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// Database of the outbox.
    pub database: DatabaseSpec,
    /// Kafka.
    pub kafka: KafkaSpec,
    /// Coordination between replicas.
    #[serde(default)]
    pub coordination: CoordinationSpec,
    /// Replicas (one publishes, the others stand by, unless `competing`).
    #[serde(default = "default_relay_replicas")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
    /// Events per claim transaction.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1, max = 50000))]
    pub batch_size: i32,
    /// Batches claimed and sent before the oldest one is acknowledged (1: one at a time). More overlaps
    /// the database's work with the broker's round trips; each batch in flight holds a database
    /// connection and may be published again after a crash.
    #[serde(default = "default_in_flight_batches")]
    #[schemars(range(min = 1, max = 8))]
    pub in_flight_batches: i32,
    /// Poll interval when drained, in milliseconds.
    #[serde(default = "default_poll")]
    #[schemars(range(min = 10, max = 60000))]
    pub poll_interval_ms: i32,
    /// Attempts before an event is dead-lettered.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
    /// After a dead letter.
    #[serde(default)]
    pub poison: PoisonPolicy,
    /// Also publish dead events to `<topic>.dlq`.
    #[serde(default)]
    pub dlq: bool,
    /// Delivered rows.
    #[serde(default)]
    pub retention: Retention,
    /// Relay image (default: the operator's matching version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pod and container customisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
}

fn default_relay_replicas() -> i32 {
    2
}
fn default_batch() -> i32 {
    1000
}
fn default_in_flight_batches() -> i32 {
    8
}
fn default_poll() -> i32 {
    500
}
fn default_attempts() -> i32 {
    10
}

/// Observed state of an [`OutboxRelay`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// kstatus conditions: `Ready`, and `Reconciling`/`Stalled` when abnormal.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pod holding the Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// `leaseTransitions` of the Lease (the fencing epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i32>,
    /// Pending events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Age of the oldest pending event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_seconds: Option<f64>,
}

/// Whether a topic is deleted with its ConsumerGroup.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
pub enum DeletionPolicy {
    /// Kept (no finalizer).
    #[default]
    Retain,
    /// Deleted with the resource (finalizer).
    Delete,
}

/// Replicas beyond the partition count.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default,
)]
pub enum PartitionPolicy {
    /// Effective replicas = partitions (Warning event `ScaleCapped`).
    #[default]
    Cap,
    /// Raise partitions to the replica count (never shrink).
    GrowPartitions,
}

/// A topic the group consumes, managed by the operator. An item of a list keyed by `name`, so the API
/// server pairs it with its old self and the transition rule compares one topic, not every pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.partitions >= oldSelf.partitions").message("partitions never decrease")
)]
pub struct TopicSpec {
    /// Kafka topic name.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub name: String,
    /// Partitions (never decrease).
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    /// Replication factor at creation.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10))]
    pub replication_factor: i32,
    /// Topic configuration (`retention.ms`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Delete the topic with the resource?
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn one() -> i32 {
    1
}

/// Lag-based autoscaling of a ConsumerGroup (see `operator::autoscale` for the rule). While it is set the
/// operator owns `spec.replicas` and writes it through the `/scale` subresource; do not combine it with an HPA
/// or KEDA on the same group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas")
)]
pub struct AutoscalingSpec {
    /// Fewest replicas (0 lets an idle group scale to zero).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas (also capped at the largest topic's partitions with `partitionPolicy: Cap`).
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Lag one replica should carry: the target is ceil(total lag / lagPerReplica).
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub lag_per_replica: i64,
    /// A group at 0 replicas wakes once its lag reaches this (and stays at 0 below it).
    #[serde(default = "default_activation_lag")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub activation_lag: i64,
    /// Scaling up acts on the lowest recommendation of this many seconds.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// Scaling down acts on the highest recommendation of this many seconds (and reaches 0 only after
    /// this long without lag).
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// How often lag is read and a decision made.
    #[serde(default = "default_autoscale_poll")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: i32,
}

fn default_activation_lag() -> i64 {
    1
}
fn default_scale_down_window() -> i32 {
    300
}
fn default_autoscale_poll() -> i32 {
    15
}

/// A consumer group: a Deployment of the consumer image, its topics and partitions.
// Several `printcolumn(...)` entries share keys on purpose; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Default, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "ConsumerGroup",
    derive = "Default",
    namespaced,
    shortname = "cg",
    category = "outbox",
    status = "ConsumerGroupStatus",
    doc = "An idempotent consumer group with its topics",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.autoscaling.desiredReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.totalPartitions"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    cel
)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupSpec {
    /// Kafka consumer group id (immutable: a new id is a new group).
    #[x_kube(validation = Rule::new("self == oldSelf").message("groupId is immutable"))]
    #[schemars(length(min = 1, max = 249))]
    pub group_id: String,
    /// Kafka (topics are created there; the consumers connect to it).
    pub kafka: KafkaSpec,
    /// The database holding the inbox (and the handler's tables).
    pub database: InboxDatabaseSpec,
    /// Topics (a list keyed by `name`).
    // Bounded (50 items, names ≤ 249 characters) so the API server's CEL cost estimate fits its budget.
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("oldSelf.all(o, self.exists(t, t.name == o.name))").message("topics cannot be removed or renamed")
    )]
    #[schemars(length(min = 1, max = 50))]
    pub topics: Vec<TopicSpec>,
    /// Consumer replicas (the /scale subresource).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Replicas beyond the partition count.
    #[serde(default)]
    pub partition_policy: PartitionPolicy,
    /// Scale `replicas` on the group's lag (absent: `replicas` is whatever you, an HPA or KEDA set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Consumer image.
    pub image: String,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pod and container customisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
}

/// Observed state of a [`ConsumerGroup`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupStatus {
    /// kstatus conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Ready pods.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, as a string (for /scale, HPA, KEDA).
    #[serde(default)]
    pub selector: String,
    /// Partitions per topic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, i32>,
    /// Sum of partitions over the topics.
    #[serde(default)]
    pub total_partitions: i32,
    /// High watermark − committed offset, summed over partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// The autoscaler's last decision (with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The autoscaler's last decision.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas the autoscaler set.
    pub desired_replicas: i32,
    /// This round's recommendation before the stabilization windows.
    pub recommended_replicas: i32,
    /// Why (`ScaleUp`, `ScaleDown`, `Activated`, `BelowActivation`, `Steady`, `ScaleUpStabilizing`,
    /// `ScaleDownStabilizing`, `AtMax`, `AtPartitions`, `AtMin`).
    pub reason: String,
    /// The lag the decision used.
    pub lag: i64,
    /// When the autoscaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Recent recommendations (change points), which the stabilization windows look back on.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub history: Vec<Recommendation>,
}

/// One recommendation in the history: `replicas` from second `since` (Unix time) until the next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// Recommended replicas.
    pub replicas: i32,
    /// Unix time (seconds) from which it held.
    pub since: i64,
}

/// First line of every generated file.
pub const GENERATED: &str =
    "# Generated by `cargo run -p operator --bin crdgen` from contract/src/crd.rs; do not edit.";

/// The CRDs as YAML documents, by file name (what `crdgen` writes to `crds/`).
pub fn crd_files() -> Vec<(&'static str, String)> {
    let yaml = |crd| {
        format!(
            "{GENERATED}\n{}",
            serde_norway::to_string(&crd).expect("CRD serializes")
        )
    };
    vec![
        ("outboxrelays.outbox.dev.yaml", yaml(OutboxRelay::crd())),
        ("consumergroups.outbox.dev.yaml", yaml(ConsumerGroup::crd())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn the_constants_name_what_the_derives_serve() {
        assert_eq!(OutboxRelay::group(&()), GROUP);
        assert_eq!(OutboxRelay::version(&()), VERSION);
        assert_eq!(OutboxRelay::api_version(&()), API_VERSION);
        assert_eq!(ConsumerGroup::api_version(&()), API_VERSION);
        assert_eq!(OutboxRelay::plural(&()), "outboxrelays");
    }
}
