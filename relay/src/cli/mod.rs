//! Command line of `outbox-relay`: every flag is also an environment variable. Bad settings exit with
//! code 2 and one line naming the flag and its variable.
//!
//! `args` holds the flags, `compose` the composition root of `outbox-relay run` (database, producer,
//! coordinator, relay, probes), `maintenance` the bodies of `replay` and `dead`; this module parses, checks the
//! settings and dispatches.

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
use crate::decide::{PoisonPolicy, RetryPolicy};
use crate::health::Health;
use crate::kube_lease::LeaseCoordinator;
use crate::metrics::Metrics;
use crate::producer::{KafkaSettings, Partitioning, Producer};
use crate::relay::{wait_for_broker, Relay, RelayConfig};
use crate::store::{idle_in_transaction_timeout, Retention};
use crate::tools::{self, DeadSelector, ReplayFilter};
use lease_election::{LeaseClient, Timings};

mod args;
mod compose;
mod maintenance;

pub use args::*;
use compose::run;
use maintenance::{dead, replay};

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
        contract::kafka_guard::Process::Relay,
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
