//! Flags and environment of a consumer process, and the process around a [`Handler`]: logs, probes,
//! database wait, migrations, the runtime, SIGTERM. Every flag has an environment variable; bad values
//! exit with code 2 and one line naming both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use contract::env::{common, consumer};
use outbox::SchemaName;
use process_kit::security::{merge_kafka_properties, DatabaseTlsArgs, KafkaSecurityArgs};
use process_kit::service::{
    config_error, database_options, kafka_settings, shutdown_signal, wait_for_database, LogFormat,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::health::Surfaces;
use crate::metrics::Metrics;
use crate::{Handler, RetryPolicy, Runtime, RuntimeConfig};

/// Settings every consumer process takes.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Consumer group id (also the inbox's group column).
    #[arg(long, env = consumer::GROUP_ID)]
    pub group_id: Option<String>,
    /// Topics to consume, comma-separated.
    #[arg(
        long,
        env = consumer::TOPICS,
        value_delimiter = ',',
        default_value = "orders"
    )]
    pub topics: Vec<String>,
    /// PostgreSQL URL of the database holding the inbox and the handler's tables.
    #[arg(long, env = common::DATABASE_URL, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long, env = common::KAFKA_BOOTSTRAP, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka properties, `key=value` (repeat or comma-separate), e.g. for SASL/TLS.
    #[arg(long, env = consumer::KAFKA_CONFIG, value_delimiter = ',')]
    pub kafka_config: Vec<String>,
    /// TLS and SASL to Kafka.
    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,
    /// TLS to PostgreSQL.
    #[command(flatten)]
    pub database_tls: DatabaseTlsArgs,
    /// Partitions handled at the same time; each uses a database connection.
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Most records of one partition handled in one transaction (1 = a transaction per record).
    #[arg(long, env = "CONSUMER_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Handler attempts before a record goes to `<topic>.dlq`.
    #[arg(long, env = "CONSUMER_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// First retry backoff (doubles per attempt, equal jitter).
    #[arg(long, env = "CONSUMER_BACKOFF_BASE", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// Longest retry backoff.
    #[arg(long, env = "CONSUMER_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Group session timeout: how soon a dead member's partitions move to the others.
    #[arg(long, env = "CONSUMER_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,
    /// Replace the Kafka client when its group membership stays unsettled this long while a broker
    /// answers (a coordinator that never re-admits the member).
    #[arg(long, env = "CONSUMER_REJOIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub rejoin_timeout: Duration,
    /// Process past an offset gap that is still there when fetched again. Off by default: on the relay's
    /// topics (not compacted, no transactions) a gap is loss, so the partition stops there and the
    /// `OutboxConsumerOffsetGap` alert fires. Turn it on only for compacted or transactional topics.
    #[arg(long, env = "CONSUMER_ACCEPT_OFFSET_GAPS", default_value_t = false, action = clap::ArgAction::Set)]
    pub accept_offset_gaps: bool,
    /// Schema of the inbox table.
    #[arg(long, env = consumer::INBOX_SCHEMA, default_value = crate::inbox::DEFAULT_SCHEMA)]
    pub inbox_schema: String,
    /// Delete inbox rows older than this (keep it longer than the topic's retention.ms, or a replay
    /// older than the window would run effects again); `0s` keeps them forever.
    #[arg(long, env = "CONSUMER_INBOX_RETENTION", default_value = "14d", value_parser = humantime::parse_duration)]
    pub inbox_retention: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = consumer::HTTP_ADDR, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Name of this instance in logs and as Kafka client id (default: host name and pid).
    #[arg(long, env = consumer::INSTANCE_ID)]
    pub instance_id: Option<String>,
    /// Apply the inbox (and handler) migrations at start-up.
    #[arg(long, env = "CONSUMER_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Log format (the operator sets `json` on the pods it runs); pass it to
    /// `process_kit::service::init_logging`.
    #[arg(long, env = common::LOG_FORMAT, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl ConsumerArgs {
    /// Checks the settings and builds the runtime's configuration (pure; exposed for tests).
    pub fn runtime_config(&self, default_group: Option<&str>) -> anyhow::Result<RuntimeConfig> {
        let group_id = self
            .group_id
            .clone()
            .or_else(|| default_group.map(str::to_owned))
            .filter(|g| !g.trim().is_empty())
            .ok_or_else(|| config_error("--group-id", "CONSUMER_GROUP_ID", "is required"))?;
        let topics: Vec<String> = self
            .topics
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if topics.is_empty() {
            return Err(config_error("--topics", "CONSUMER_TOPICS", "is empty"));
        }
        for t in &topics {
            outbox::validate::topic(t)
                .map_err(|e| config_error("--topics", "CONSUMER_TOPICS", e.reason))?;
        }
        let kafka_extra = merge_kafka_properties(
            kafka_settings(
                &self.brokers,
                ("--brokers", "KAFKA_BOOTSTRAP"),
                &self.kafka_config,
                ("--kafka-config", "CONSUMER_KAFKA_CONFIG"),
                contract::kafka_guard::Process::Consumer,
            )?,
            self.kafka_security.properties(&std::env::temp_dir())?,
            ("--kafka-config", "CONSUMER_KAFKA_CONFIG"),
        )?;
        if self.backoff_base > self.backoff_max {
            return Err(config_error(
                "--backoff-base",
                "CONSUMER_BACKOFF_BASE",
                "must not exceed --backoff-max",
            ));
        }
        if self.rejoin_timeout <= self.session_timeout {
            // Rejoining after a session timeout legitimately takes about one session timeout.
            return Err(config_error(
                "--rejoin-timeout",
                "CONSUMER_REJOIN_TIMEOUT",
                "must be longer than --session-timeout",
            ));
        }
        let inbox_schema = SchemaName::new(&self.inbox_schema)
            .map_err(|e| config_error("--inbox-schema", "CONSUMER_INBOX_SCHEMA", e.reason))?;
        let instance_id = self.instance_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| group_id.clone());
            format!("{host}-{}", std::process::id())
        });
        Ok(RuntimeConfig {
            group_id,
            topics,
            brokers: self.brokers.clone(),
            kafka_extra,
            inbox_schema,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                backoff_base: self.backoff_base,
                backoff_max: self.backoff_max,
            },
            session_timeout: self.session_timeout,
            rejoin_timeout: self.rejoin_timeout,
            accept_offset_gaps: self.accept_offset_gaps,
            instance_id,
            batch_size: self.batch_size as usize,
            concurrency: self.concurrency as usize,
            inbox_retention: (!self.inbox_retention.is_zero()).then_some(self.inbox_retention),
        })
    }
}

/// Runs a consumer process until SIGTERM/SIGINT: probes, database wait, migrations (the inbox, then
/// `migrate_app` for the handler's own tables), then the runtime.
pub async fn serve<H, F, Fut>(
    args: ConsumerArgs,
    default_group: Option<&str>,
    handler: H,
    migrate_app: F,
) -> anyhow::Result<()>
where
    H: Handler,
    F: FnOnce(PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cfg = args.runtime_config(default_group)?;
    let opts = args.database_tls.apply(database_options(
        args.database_url.as_deref(),
        "--database-url",
        "DATABASE_URL",
    )?)?;
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::default());
    let pool = PgPoolOptions::new()
        .max_connections(cfg.concurrency as u32 + 2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts.clone());
    let runtime = Runtime::new(cfg.clone(), pool.clone(), handler, metrics.clone())
        .map_err(|e| config_error("--kafka-config", "CONSUMER_KAFKA_CONFIG", e))?;
    let surfaces = Surfaces {
        health: runtime.health(),
        metrics,
    };
    let addr = process_kit::surfaces::serve(args.http_addr, Arc::new(surfaces), shutdown.clone())
        .await
        .map_err(|e| config_error("--http-addr", "CONSUMER_HTTP_ADDR", e))?;
    tracing::info!(group = %cfg.group_id, instance = %cfg.instance_id, "serving /healthz /readyz /metrics on http://{addr}");
    if !wait_for_database(&opts, &shutdown).await {
        return Ok(());
    }
    if args.migrate {
        crate::inbox::migrate(&pool, &cfg.inbox_schema).await?;
        migrate_app(pool.clone()).await?;
    }
    runtime.run(shutdown).await?;
    tracing::info!(group = %cfg.group_id, instance = %cfg.instance_id, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: ConsumerArgs,
    }

    fn parse(args: &[&str]) -> ConsumerArgs {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .c
    }

    #[test]
    fn defaults_and_bad_values_name_the_flag() {
        let cfg = parse(&["--brokers", "k:9092"])
            .runtime_config(Some("pharmacy"))
            .unwrap();
        assert_eq!(cfg.group_id, "pharmacy");
        assert_eq!(cfg.topics, vec!["orders"]);
        assert_eq!(cfg.inbox_retention, Some(Duration::from_secs(14 * 86_400)));
        let err = |args: &[&str]| parse(args).runtime_config(None).unwrap_err().to_string();
        assert_eq!(
            err(&[]),
            "invalid --group-id (CONSUMER_GROUP_ID): is required"
        );
        assert!(err(&["--group-id", "g", "--topics", "bad topic"])
            .starts_with("invalid --topics (CONSUMER_TOPICS):"));
        assert!(err(&["--group-id", "g", "--brokers", "nohost"])
            .starts_with("invalid --brokers (KAFKA_BOOTSTRAP):"));
        assert!(err(&[
            "--group-id",
            "g",
            "--backoff-base",
            "1m",
            "--backoff-max",
            "1s"
        ])
        .starts_with("invalid --backoff-base (CONSUMER_BACKOFF_BASE)"));
        assert!(Cli::try_parse_from(["x", "--concurrency", "0"]).is_err());
        let cfg = parse(&[
            "--group-id",
            "g",
            "--topics",
            "a, b",
            "--inbox-retention",
            "0s",
        ])
        .runtime_config(None)
        .unwrap();
        assert_eq!(cfg.topics, vec!["a", "b"]);
        assert_eq!(cfg.inbox_retention, None);
    }
}
