//! The flags of `outbox-relay` and its subcommands; the environment variable names the operator sets come
//! from the `contract` crate.

use contract::env::{common, relay};

use super::*;

/// `outbox-relay`: moves committed outbox events from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub(super) db: DbArgs,
    /// Log format.
    #[arg(
        long,
        env = common::LOG_FORMAT,
        value_enum,
        default_value = "text",
        global = true
    )]
    pub(super) log_format: LogFormat,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Args)]
pub(super) struct DbArgs {
    /// PostgreSQL URL of the database holding the outbox.
    #[arg(long, env = common::DATABASE_URL, global = true, hide_env_values = true)]
    pub(super) database_url: Option<String>,
    /// Outbox schema.
    #[arg(long, env = relay::OUTBOX_SCHEMA, default_value = outbox::DEFAULT_SCHEMA, global = true)]
    pub(super) schema: String,
    #[command(flatten)]
    pub(super) tls: DatabaseTlsArgs,
}

#[derive(Debug, Args)]
pub(super) struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = common::KAFKA_BOOTSTRAP)]
    pub(super) brokers: String,
    /// Extra librdkafka properties `key=value` (SASL, TLS...), repeatable or comma-separated.
    #[arg(
        long = "kafka-config",
        env = relay::KAFKA_CONFIG,
        value_delimiter = ','
    )]
    pub(super) kafka_config: Vec<String>,
    #[command(flatten)]
    pub(super) security: KafkaSecurityArgs,
    /// How long a record may wait for its acknowledgment before the attempt fails.
    #[arg(long, env = "RELAY_DELIVERY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(super) delivery_timeout: Duration,
    /// Producer linger.
    #[arg(long, env = "RELAY_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub(super) linger: Duration,
    /// Largest record the producer sends; larger events are dead-lettered before sending.
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 1_000_000)]
    pub(super) max_message_bytes: usize,
    /// Partition assignment.
    #[arg(long, env = "RELAY_PARTITIONING", value_enum, default_value = "key")]
    pub(super) partitioning: Partitioning,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Run the relay loop.
    Run(Box<RunArgs>),
    /// Apply the outbox schema migrations and exit.
    Migrate {
        /// Install (true) or remove (false) the NOTIFY trigger that wakes relays on insert.
        #[arg(long, env = "RELAY_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
        notify_trigger: bool,
    },
    /// Re-publish archived events.
    Replay(Box<ReplayArgs>),
    /// Inspect and redrive dead-lettered events.
    #[command(subcommand)]
    Dead(DeadCommand),
}

/// How relays coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Coordination {
    /// One publisher per outbox (PostgreSQL advisory lock); others wait.
    Single,
    /// One publisher per Kubernetes Lease (client-go semantics); others stand by. Needs a kubeconfig or
    /// an in-cluster service account.
    Lease,
    /// Several publishers share the work; no ordering across their batches.
    Competing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum RetentionMode {
    Delete,
    Archive,
}

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) kafka: KafkaArgs,
    /// Events claimed per transaction.
    #[arg(long, env = relay::BATCH_SIZE, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=50_000))]
    pub(super) batch_size: i64,
    /// Batches claimed and sent before the oldest one is acknowledged (1: one at a time).
    #[arg(long, env = relay::IN_FLIGHT_BATCHES, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub(super) in_flight_batches: u16,
    /// Poll interval when the outbox is drained.
    #[arg(long, env = relay::POLL_INTERVAL, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub(super) poll_interval: Duration,
    /// LISTEN for inserts (needs the trigger, see `migrate --notify-trigger`).
    #[arg(long, env = "RELAY_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) notify: bool,
    /// Attempts before an event is dead-lettered.
    #[arg(long, env = relay::MAX_ATTEMPTS, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    pub(super) max_attempts: i32,
    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "RELAY_BACKOFF_BASE", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub(super) backoff_base: Duration,
    /// Retry delay ceiling.
    #[arg(long, env = "RELAY_BACKOFF_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    pub(super) backoff_max: Duration,
    /// What later events of a dead-lettered event's key do.
    #[arg(long, env = relay::POISON, value_enum, default_value = "park-key")]
    pub(super) poison: PoisonPolicy,
    /// Also publish dead events to `<topic>.dlq`.
    #[arg(long, env = relay::DLQ, default_value_t = false, action = clap::ArgAction::Set)]
    pub(super) dlq: bool,
    /// Delete delivered rows, or move them to the archive.
    #[arg(long, env = relay::RETENTION, value_enum, default_value = "delete")]
    pub(super) retention: RetentionMode,
    /// Days archived events are kept (whole day partitions are dropped).
    #[arg(long, env = "RELAY_ARCHIVE_TTL_DAYS", default_value_t = 7)]
    pub(super) archive_ttl_days: u32,
    /// Coordination mode.
    #[arg(long, env = relay::COORDINATION, value_enum, default_value = "single")]
    pub(super) coordination: Coordination,
    /// Fencing scope shared by the relays of one outbox.
    #[arg(long, env = relay::FENCE_SCOPE, default_value = "default")]
    pub(super) fence_scope: String,
    /// Lease name (lease mode).
    #[arg(long, env = relay::LEASE_NAME, default_value = "outbox-relay")]
    pub(super) lease_name: String,
    /// Lease namespace (lease mode); default: the pod's namespace or the kubeconfig's.
    #[arg(long, env = common::POD_NAMESPACE)]
    pub(super) lease_namespace: Option<String>,
    /// How long the Lease stays valid without renewal (lease mode).
    #[arg(long, env = relay::LEASE_DURATION, default_value = "15s", value_parser = humantime::parse_duration)]
    pub(super) lease_duration: Duration,
    /// The holder stops publishing when it could not renew for this long (lease mode).
    #[arg(long, env = relay::RENEW_DEADLINE, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(super) renew_deadline: Duration,
    /// Pause between Lease attempts (lease mode).
    #[arg(long, env = relay::RETRY_PERIOD, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(super) retry_period: Duration,
    /// OutboxRelay whose status the leader keeps up to date (backlog, oldest pending age, leader; lease
    /// mode, every 15 s).
    #[arg(long, env = relay::STATUS_RESOURCE)]
    pub(super) status_resource: Option<String>,
    /// Report a healthy standby as ready on /readyz (Kubernetes: rolling updates need Ready standbys).
    #[arg(long, env = relay::STANDBY_READY, default_value_t = false, action = clap::ArgAction::Set)]
    pub(super) standby_ready: bool,
    /// How often a standby retries the advisory lock.
    #[arg(long, env = "RELAY_LOCK_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub(super) lock_retry: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = relay::HTTP_ADDR, default_value = "0.0.0.0:9090")]
    pub(super) http_addr: SocketAddr,
    /// Apply migrations at startup.
    #[arg(long, env = "RELAY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub(super) migrate: bool,
    /// Name of this instance in logs and the fence table.
    #[arg(long, env = common::POD_NAME)]
    pub(super) instance_id: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
    #[command(flatten)]
    pub(super) kafka: KafkaArgs,
    /// Events created at or after (RFC 3339).
    #[arg(long)]
    pub(super) since: DateTime<Utc>,
    /// Events created before (RFC 3339); default now.
    #[arg(long)]
    pub(super) until: Option<DateTime<Utc>>,
    /// Only this key.
    #[arg(long)]
    pub(super) key: Option<String>,
    /// Only events of this topic.
    #[arg(long)]
    pub(super) topic: Option<String>,
    /// Publish to this topic instead of the original one.
    #[arg(long)]
    pub(super) to_topic: Option<String>,
    /// Count what would be replayed; produce nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
}

#[derive(Debug, Args)]
pub(super) struct Selector {
    /// One event.
    #[arg(long)]
    pub(super) event_id: Option<uuid::Uuid>,
    /// Events of one key.
    #[arg(long)]
    pub(super) key: Option<String>,
    /// Events of one topic.
    #[arg(long)]
    pub(super) topic: Option<String>,
}

impl Selector {
    pub(super) fn to_selector(&self) -> DeadSelector {
        DeadSelector {
            event_id: self.event_id,
            key: self.key.clone(),
            topic: self.topic.clone(),
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.event_id.is_none() && self.key.is_none() && self.topic.is_none()
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum DeadCommand {
    /// List dead events.
    List {
        #[command(flatten)]
        sel: Selector,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead events back to the outbox (original ids, attempts reset); their keys unpark.
    Redrive {
        #[command(flatten)]
        sel: Selector,
        /// Every dead event.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead events for good; their keys unpark.
    Discard {
        #[command(flatten)]
        sel: Selector,
        /// Every dead event.
        #[arg(long)]
        all: bool,
    },
}
