//! Command line of `outbox-relay`: every flag is also an environment variable. Bad settings exit with
//! code 2 and one line naming the flag and its variable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox::SchemaName;
use process_kit::security::{merge_kafka_properties, DatabaseTlsArgs, KafkaSecurityArgs};
use process_kit::service::{
    config_error, database_options, exit_code, init_logging, shutdown_signal, wait_for_database,
    LogFormat,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::coordinator::{Competing, Coordinator, SingleLock};
use crate::health::Health;
use crate::kube_lease::LeaseCoordinator;
use crate::metrics::Metrics;
use crate::plan::{PoisonPolicy, RetryPolicy};
use crate::producer::{KafkaSettings, Partitioning, Producer};
use crate::relay::{wait_for_broker, Relay, RelayConfig};
use crate::store::{idle_in_transaction_timeout, Retention};
use crate::tools::{self, DeadSelector, ReplayFilter};
use contract::env::{common, relay};
use lease_election::{LeaseClient, Timings};

/// `outbox-relay`: moves committed outbox events from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    #[command(flatten)]
    db: DbArgs,
    /// Log format.
    #[arg(
        long,
        env = common::LOG_FORMAT,
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct DbArgs {
    /// PostgreSQL URL of the database holding the outbox.
    #[arg(long, env = common::DATABASE_URL, global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Outbox schema.
    #[arg(long, env = relay::OUTBOX_SCHEMA, default_value = outbox::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(flatten)]
    tls: DatabaseTlsArgs,
}

#[derive(Debug, Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = common::KAFKA_BOOTSTRAP)]
    brokers: String,
    /// Extra librdkafka properties `key=value` (SASL, TLS...), repeatable or comma-separated.
    #[arg(
        long = "kafka-config",
        env = relay::KAFKA_CONFIG,
        value_delimiter = ','
    )]
    kafka_config: Vec<String>,
    #[command(flatten)]
    security: KafkaSecurityArgs,
    /// How long a record may wait for its acknowledgment before the attempt fails.
    #[arg(long, env = "RELAY_DELIVERY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
    /// Producer linger.
    #[arg(long, env = "RELAY_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// Largest record the producer sends; larger events are dead-lettered before sending.
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 1_000_000)]
    max_message_bytes: usize,
    /// Partition assignment.
    #[arg(long, env = "RELAY_PARTITIONING", value_enum, default_value = "key")]
    partitioning: Partitioning,
}

#[derive(Debug, Subcommand)]
enum Command {
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
enum RetentionMode {
    Delete,
    Archive,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Events claimed per transaction.
    #[arg(long, env = relay::BATCH_SIZE, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=50_000))]
    batch_size: i64,
    /// Batches claimed and sent before the oldest one is acknowledged (1: one at a time).
    #[arg(long, env = relay::IN_FLIGHT_BATCHES, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=8))]
    in_flight_batches: u16,
    /// Poll interval when the outbox is drained.
    #[arg(long, env = relay::POLL_INTERVAL, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// LISTEN for inserts (needs the trigger, see `migrate --notify-trigger`).
    #[arg(long, env = "RELAY_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    notify: bool,
    /// Attempts before an event is dead-lettered.
    #[arg(long, env = relay::MAX_ATTEMPTS, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    max_attempts: i32,
    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "RELAY_BACKOFF_BASE", default_value = "500ms", value_parser = humantime::parse_duration)]
    backoff_base: Duration,
    /// Retry delay ceiling.
    #[arg(long, env = "RELAY_BACKOFF_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// What later events of a dead-lettered event's key do.
    #[arg(long, env = relay::POISON, value_enum, default_value = "park-key")]
    poison: PoisonPolicy,
    /// Also publish dead events to `<topic>.dlq`.
    #[arg(long, env = relay::DLQ, default_value_t = false, action = clap::ArgAction::Set)]
    dlq: bool,
    /// Delete delivered rows, or move them to the archive.
    #[arg(long, env = relay::RETENTION, value_enum, default_value = "delete")]
    retention: RetentionMode,
    /// Days archived events are kept (whole day partitions are dropped).
    #[arg(long, env = "RELAY_ARCHIVE_TTL_DAYS", default_value_t = 7)]
    archive_ttl_days: u32,
    /// Coordination mode.
    #[arg(long, env = relay::COORDINATION, value_enum, default_value = "single")]
    coordination: Coordination,
    /// Fencing scope shared by the relays of one outbox.
    #[arg(long, env = relay::FENCE_SCOPE, default_value = "default")]
    fence_scope: String,
    /// Lease name (lease mode).
    #[arg(long, env = relay::LEASE_NAME, default_value = "outbox-relay")]
    lease_name: String,
    /// Lease namespace (lease mode); default: the pod's namespace or the kubeconfig's.
    #[arg(long, env = common::POD_NAMESPACE)]
    lease_namespace: Option<String>,
    /// How long the Lease stays valid without renewal (lease mode).
    #[arg(long, env = relay::LEASE_DURATION, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// The holder stops publishing when it could not renew for this long (lease mode).
    #[arg(long, env = relay::RENEW_DEADLINE, default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// Pause between Lease attempts (lease mode).
    #[arg(long, env = relay::RETRY_PERIOD, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// OutboxRelay whose status the leader keeps up to date (backlog, oldest pending age, leader; lease
    /// mode, every 15 s).
    #[arg(long, env = relay::STATUS_RESOURCE)]
    status_resource: Option<String>,
    /// Report a healthy standby as ready on /readyz (Kubernetes: rolling updates need Ready standbys).
    #[arg(long, env = relay::STANDBY_READY, default_value_t = false, action = clap::ArgAction::Set)]
    standby_ready: bool,
    /// How often a standby retries the advisory lock.
    #[arg(long, env = "RELAY_LOCK_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    lock_retry: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = relay::HTTP_ADDR, default_value = "0.0.0.0:9090")]
    http_addr: SocketAddr,
    /// Apply migrations at startup.
    #[arg(long, env = "RELAY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    migrate: bool,
    /// Name of this instance in logs and the fence table.
    #[arg(long, env = common::POD_NAME)]
    instance_id: Option<String>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Events created at or after (RFC 3339).
    #[arg(long)]
    since: DateTime<Utc>,
    /// Events created before (RFC 3339); default now.
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// Only this key.
    #[arg(long)]
    key: Option<String>,
    /// Only events of this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Publish to this topic instead of the original one.
    #[arg(long)]
    to_topic: Option<String>,
    /// Count what would be replayed; produce nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct Selector {
    /// One event.
    #[arg(long)]
    event_id: Option<uuid::Uuid>,
    /// Events of one key.
    #[arg(long)]
    key: Option<String>,
    /// Events of one topic.
    #[arg(long)]
    topic: Option<String>,
}

impl Selector {
    fn to_selector(&self) -> DeadSelector {
        DeadSelector {
            event_id: self.event_id,
            key: self.key.clone(),
            topic: self.topic.clone(),
        }
    }
    fn is_empty(&self) -> bool {
        self.event_id.is_none() && self.key.is_none() && self.topic.is_none()
    }
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
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

fn db_options(db: &DbArgs) -> anyhow::Result<(PgConnectOptions, SchemaName)> {
    let opts = database_options(db.database_url.as_deref(), "--database-url", "DATABASE_URL")?;
    let opts = db.tls.apply(opts)?;
    let schema = SchemaName::new(&db.schema)
        .map_err(|e| config_error("--schema", "OUTBOX_SCHEMA", e.reason))?;
    Ok((opts, schema))
}

/// Validates broker and extra-property settings (pure; exposed for tests).
pub fn parse_kafka(brokers: &str, extra: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    process_kit::service::kafka_settings(
        brokers,
        ("--brokers", "KAFKA_BOOTSTRAP"),
        extra,
        ("--kafka-config", "RELAY_KAFKA_CONFIG"),
    )
}

fn kafka_settings(k: &KafkaArgs) -> anyhow::Result<KafkaSettings> {
    Ok(KafkaSettings {
        extra: merge_kafka_properties(
            parse_kafka(&k.brokers, &k.kafka_config)?,
            k.security.properties(&std::env::temp_dir())?,
            ("--kafka-config", "RELAY_KAFKA_CONFIG"),
        )?,
        brokers: k.brokers.clone(),
        delivery_timeout: k.delivery_timeout,
        linger: k.linger,
        max_message_bytes: k.max_message_bytes,
        partitioning: k.partitioning,
    })
}

/// Entry point of the binary. Returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    exit_code("outbox-relay", dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let (opts, schema) = db_options(&cli.db)?;
    match cli.command {
        Command::Run(args) => run(*args, opts, schema).await,
        Command::Migrate { notify_trigger } => {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .context("connect")?;
            outbox::migrate(&pool, schema.as_str()).await?;
            if notify_trigger {
                outbox::install_notify_trigger(&pool, &schema).await?;
            } else {
                outbox::remove_notify_trigger(&pool, &schema).await?;
            }
            println!(
                "schema `{schema}` is up to date (notify trigger: {})",
                if notify_trigger { "on" } else { "off" }
            );
            Ok(())
        }
        Command::Replay(args) => replay(*args, opts, schema).await,
        Command::Dead(cmd) => dead(cmd, opts, schema).await,
    }
}

async fn run(args: RunArgs, opts: PgConnectOptions, schema: SchemaName) -> anyhow::Result<()> {
    let kafka = kafka_settings(&args.kafka)?;
    if args.backoff_base > args.backoff_max {
        return Err(config_error(
            "--backoff-base",
            "RELAY_BACKOFF_BASE",
            "must not exceed --backoff-max",
        ));
    }
    let timings = Timings {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    if let Err(why) = timings.validate() {
        return Err(config_error(
            "--lease-duration/--renew-deadline/--retry-period",
            "RELAY_LEASE_DURATION/RELAY_RENEW_DEADLINE/RELAY_RETRY_PERIOD",
            why,
        ));
    }
    let instance = args.instance_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into());
        format!("{host}-{}", std::process::id())
    });
    let shutdown = shutdown_signal();
    let health = Arc::new(if args.standby_ready {
        Health::standby_ready()
    } else {
        Health::default()
    });
    let metrics = Arc::new(Metrics::new());
    let addr = crate::http::serve(
        args.http_addr,
        crate::http::Surfaces {
            health: health.clone(),
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    )
    .await
    .map_err(|e| config_error("--http-addr", "RELAY_HTTP_ADDR", e))?;
    tracing::info!(instance = %instance, "outbox-relay serving /healthz /readyz /metrics on http://{addr}");

    let session_opts = opts.clone().options([(
        "idle_in_transaction_session_timeout",
        format!(
            "{}ms",
            idle_in_transaction_timeout(kafka.delivery_timeout).as_millis()
        ),
    )]);
    // One connection per batch in flight, plus the claim overlapping a commit, the NOTIFY listener, the
    // monitors and the coordinator.
    let pool = PgPoolOptions::new()
        .max_connections(u32::from(args.in_flight_batches) + 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(session_opts.clone());
    if !wait_for_database(&session_opts, &shutdown).await {
        return Ok(());
    }
    if args.migrate {
        outbox::migrate(&pool, schema.as_str()).await?;
        if args.notify {
            outbox::install_notify_trigger(&pool, &schema).await?;
        }
    }
    let producer = Producer::new(kafka, health.clone())
        .map_err(|e| config_error("--kafka-config", "RELAY_KAFKA_CONFIG", e))?;
    if !wait_for_broker(&producer, &shutdown).await {
        return Ok(());
    }
    let cfg = RelayConfig {
        schema: schema.clone(),
        batch_size: args.batch_size,
        poll_interval: args.poll_interval,
        notify: args.notify,
        retry: RetryPolicy {
            max_attempts: args.max_attempts,
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            poison: args.poison,
        },
        dlq: args.dlq,
        retention: match args.retention {
            RetentionMode::Delete => Retention::Delete,
            RetentionMode::Archive => Retention::Archive {
                ttl_days: args.archive_ttl_days,
            },
        },
        fence_scope: args.fence_scope.clone(),
        max_message_bytes: args.kafka.max_message_bytes,
        in_flight_batches: args.in_flight_batches.into(),
    };
    let relay = Arc::new(Relay::new(
        cfg,
        pool.clone(),
        producer,
        metrics.clone(),
        health.clone(),
    ));
    relay.spawn_monitors(shutdown.clone());
    let mut coordinator: Box<dyn Coordinator> = match args.coordination {
        Coordination::Single => Box::new(
            SingleLock::new(
                opts,
                pool,
                relay.store().clone(),
                args.fence_scope,
                instance,
                health,
            )
            .with_retry(args.lock_retry),
        ),
        Coordination::Competing => Box::new(Competing),
        Coordination::Lease => {
            let (client, namespace) = kube_client(args.lease_namespace.clone()).await?;
            let client_lease = LeaseClient::new(
                client.clone(),
                &namespace,
                args.lease_name.clone(),
                instance.clone(),
                timings,
            );
            if let Some(name) = args.status_resource.clone() {
                crate::status::spawn_reporter(
                    client,
                    &namespace,
                    name,
                    metrics.clone(),
                    shutdown.clone(),
                );
            }
            Box::new(LeaseCoordinator::new(
                client_lease,
                pool,
                relay.store().clone(),
                args.fence_scope,
                health,
                metrics.clone(),
            ))
        }
    };
    relay.run(coordinator.as_mut(), shutdown).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A client from the in-cluster service account or the kubeconfig, and the namespace to use.
async fn kube_client(namespace: Option<String>) -> anyhow::Result<(kube::Client, String)> {
    // Two TLS backends are linked (sqlx's and kube's); rustls needs the process-wide choice made once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::infer().await.map_err(|e| {
        config_error(
            "--coordination lease",
            "KUBECONFIG",
            format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"),
        )
    })?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("create the Kubernetes client")?;
    Ok((client, namespace))
}

async fn replay(
    args: ReplayArgs,
    opts: PgConnectOptions,
    schema: SchemaName,
) -> anyhow::Result<()> {
    let kafka = kafka_settings(&args.kafka)?;
    let filter = ReplayFilter {
        since: args.since,
        until: args.until.unwrap_or_else(Utc::now),
        key: args.key,
        topic: args.topic,
    };
    if filter.since >= filter.until {
        return Err(config_error("--since", "-", "must be before --until"));
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .context("connect to the database")?;
    let total = tools::replay_count(&pool, &schema, &filter).await?;
    if args.dry_run {
        println!("dry run: {total} archived events match; nothing produced");
        return Ok(());
    }
    let producer = Producer::new(kafka, Arc::new(Health::default()))
        .map_err(|e| config_error("--kafka-config", "RELAY_KAFKA_CONFIG", e))?;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("static template"),
    );
    let report = tools::replay(
        &pool,
        &schema,
        &filter,
        args.to_topic.as_deref(),
        &producer,
        |n| bar.set_position(n),
    )
    .await?;
    bar.finish();
    println!("replayed {} events, {} failed", report.sent, report.failed);
    if report.failed > 0 {
        anyhow::bail!("{} events could not be replayed", report.failed);
    }
    Ok(())
}

async fn dead(cmd: DeadCommand, opts: PgConnectOptions, schema: SchemaName) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .context("connect to the database")?;
    match cmd {
        DeadCommand::List { sel, limit, json } => {
            let rows = tools::dead_list(&pool, &schema, &sel.to_selector(), limit).await?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "{:<36}  {:<20}  {:<16}  {:<13}  {:>8}  {:<6}  error",
                    "event_id", "topic", "key", "reason", "attempts", "parked"
                );
                for r in &rows {
                    let err: String = r.error.chars().take(80).collect();
                    println!(
                        "{:<36}  {:<20}  {:<16}  {:<13}  {:>8}  {:<6}  {err}",
                        r.event_id, r.topic, r.key, r.reason, r.attempts, r.parked
                    );
                }
            }
        }
        DeadCommand::Redrive { sel, all } | DeadCommand::Discard { sel, all }
            if sel.is_empty() && !all =>
        {
            return Err(config_error(
                "--event-id/--key/--topic",
                "-",
                "name the events, or pass --all",
            ));
        }
        DeadCommand::Redrive { sel, .. } => {
            let n = tools::dead_redrive(&pool, &schema, &sel.to_selector()).await?;
            println!("redrove {n} events");
        }
        DeadCommand::Discard { sel, .. } => {
            let n = tools::dead_discard(&pool, &schema, &sel.to_selector()).await?;
            println!("discarded {n} events");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_settings_are_checked() {
        assert!(parse_kafka("127.0.0.1:9092,b:1", &[]).is_ok());
        let e = parse_kafka("localhost", &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid --brokers (KAFKA_BOOTSTRAP): `localhost` is not host:port"
        );
        let e = parse_kafka("a:1", &["sasl.mechanism".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid --kafka-config (RELAY_KAFKA_CONFIG)"),
            "{e}"
        );
        assert_eq!(
            parse_kafka("a:1", &["a=b".into()]).unwrap(),
            vec![("a".into(), "b".into())]
        );
    }

    #[test]
    fn cli_parses_and_has_env_for_every_run_flag() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        for arg in run.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(
                    arg.get_env().is_some(),
                    "run flag --{id} has no environment variable"
                );
            }
        }
    }
}
