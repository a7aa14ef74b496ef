//! Flags and environment of `demo-api`; every flag has an environment variable, bad values exit 2 with
//! one line naming both.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use outbox::{Outbox, SchemaName};
use process_kit::security::DatabaseTlsArgs;
use process_kit::service::{
    config_error, database_options, shutdown_signal, wait_for_database, LogFormat,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::api::{router, AppState};
use crate::metrics::Metrics;
use crate::receipts::Sources;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `demo-api`: orders and their `OrderCreated` events in one transaction.
#[derive(Debug, Parser)]
#[command(name = "demo-api", version, about)]
pub struct Cli {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// TLS to PostgreSQL.
    #[command(flatten)]
    pub database_tls: DatabaseTlsArgs,
    /// Listen address.
    #[arg(long, env = "DEMO_API_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Outbox schema.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = outbox::DEFAULT_SCHEMA)]
    pub outbox_schema: String,
    /// Schema of the orders table.
    #[arg(long, env = "DEMO_SHOP_SCHEMA", default_value = "shop")]
    pub shop_schema: String,
    /// Schema of the consumers' inbox, read for receipts.
    #[arg(long, env = "CONSUMER_INBOX_SCHEMA", default_value = "inbox")]
    pub inbox_schema: String,
    /// Topic of `OrderCreated` events.
    #[arg(long, env = "DEMO_ORDERS_TOPIC", default_value = "orders")]
    pub orders_topic: String,
    /// Further topics `POST /messages` accepts, comma-separated (the orders topic always is).
    #[arg(long, env = "DEMO_TOPICS", value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Apply the outbox and shop migrations at start-up.
    #[arg(long, env = "DEMO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Honour `POST /orders?crash=after-commit` (exit right after the commit). Never in production.
    #[arg(long, env = "DEMO_ALLOW_CRASH", value_parser = clap::builder::FalseyValueParser::new())]
    pub allow_crash: bool,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn schema(raw: &str, flag: &'static str, env: &'static str) -> anyhow::Result<SchemaName> {
    SchemaName::new(raw).map_err(|e| config_error(flag, env, e.reason))
}

/// Checked settings.
struct Settings {
    outbox: SchemaName,
    shop: SchemaName,
    inbox: SchemaName,
    known_topics: Vec<String>,
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    outbox::validate::topic(&cli.orders_topic)
        .map_err(|e| config_error("--orders-topic", "DEMO_ORDERS_TOPIC", e.reason))?;
    let mut known_topics = vec![cli.orders_topic.clone()];
    for t in cli
        .topics
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
    {
        outbox::validate::topic(t)
            .map_err(|e| config_error("--topics", "DEMO_TOPICS", e.reason))?;
        if !known_topics.iter().any(|k| k == t) {
            known_topics.push(t.to_owned());
        }
    }
    Ok(Settings {
        outbox: schema(&cli.outbox_schema, "--outbox-schema", "OUTBOX_SCHEMA")?,
        shop: schema(&cli.shop_schema, "--shop-schema", "DEMO_SHOP_SCHEMA")?,
        inbox: schema(&cli.inbox_schema, "--inbox-schema", "CONSUMER_INBOX_SCHEMA")?,
        known_topics,
    })
}

/// Applies the outbox and shop migrations.
pub async fn migrate(
    pool: &PgPool,
    outbox_schema: &SchemaName,
    shop: &SchemaName,
) -> anyhow::Result<()> {
    outbox::migrate(pool, outbox_schema.as_str()).await?;
    outbox::migrate_schema(pool, shop, &MIGRATOR).await?;
    Ok(())
}

/// Runs the API until SIGTERM/SIGINT.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let s = settings(&cli)?;
    let opts = cli.database_tls.apply(database_options(
        cli.database_url.as_deref(),
        "--database-url",
        "DATABASE_URL",
    )?)?;
    let shutdown = shutdown_signal();
    if !wait_for_database(&opts, &shutdown).await {
        return Ok(());
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts);
    if cli.migrate {
        migrate(&pool, &s.outbox, &s.shop).await?;
    }
    let database_up = Arc::new(AtomicBool::new(true));
    let up = database_up.clone();
    tokio::spawn(process_kit::service::watch_database(
        pool.clone(),
        Duration::from_secs(2),
        shutdown.clone(),
        move |ok| up.store(ok, Ordering::Relaxed),
    ));
    let state = AppState {
        pool,
        outbox: Outbox::new(s.outbox.clone()),
        orders_table: s.shop.table("orders"),
        orders_topic: cli.orders_topic.clone(),
        known_topics: s.known_topics,
        allow_crash: cli.allow_crash,
        receipts: Sources {
            outbox: s.outbox,
            inbox: s.inbox,
            orders: s.shop.table("orders"),
        },
        metrics: Arc::new(Metrics::default()),
        database_up,
    };
    if cli.allow_crash {
        tracing::warn!(
            "DEMO_ALLOW_CRASH is set: POST /orders?crash=after-commit exits the process"
        );
    }
    let addr = process_kit::surfaces::serve_router(cli.http_addr, router(state), shutdown.clone())
        .await
        .map_err(|e| config_error("--http-addr", "DEMO_API_ADDR", e))?;
    tracing::info!("demo-api listening on http://{addr}");
    shutdown.cancelled().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_schemas_are_checked() {
        let cli = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("demo-api").chain(args.iter().copied())).unwrap()
        };
        let s = settings(&cli(&["--topics", "payments,orders, ,audit"])).unwrap();
        assert!(!cli(&[]).allow_crash);
        assert!(cli(&["--allow-crash"]).allow_crash);
        assert_eq!(s.known_topics, vec!["orders", "payments", "audit"]);
        let e = settings(&cli(&["--topics", "bad topic"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("invalid --topics (DEMO_TOPICS):"), "{e}");
        let e = settings(&cli(&["--shop-schema", "x;y"]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("invalid --shop-schema (DEMO_SHOP_SCHEMA):"),
            "{e}"
        );
    }
}
