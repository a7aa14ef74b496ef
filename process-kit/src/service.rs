//! What every long-running process of the product does the same way: one-line configuration errors with
//! exit code 2, logs on stderr (text or JSON) and trace export, SIGTERM/SIGINT handling, checked Kafka
//! settings, and (feature `database`) the PostgreSQL URL, the wait for the database and its probe.

#[cfg(feature = "database")]
use std::str::FromStr;

#[cfg(feature = "database")]
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

/// A setting that cannot work: reported as one line naming the flag and its env var; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} ({env}): {reason}")]
pub struct ConfigError {
    /// The command-line flag, e.g. `--group-id`.
    pub flag: &'static str,
    /// The environment variable of the same setting.
    pub env: &'static str,
    /// Why the value cannot work.
    pub reason: String,
}

/// Builds a [`ConfigError`] as an `anyhow::Error`.
pub fn config_error(flag: &'static str, env: &'static str, reason: impl ToString) -> anyhow::Error {
    ConfigError {
        flag,
        env,
        reason: reason.to_string(),
    }
    .into()
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The tracer provider while traces are exported, flushed by [`exit_code`].
static TRACER_PROVIDER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> =
    std::sync::OnceLock::new();

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, also exports the spans over OTLP/HTTP, configured by the
/// standard OTel variables (`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true` turns it off). Off by default.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otel, otel_error) = match otlp_tracer() {
        Ok(Some(tracer)) => (
            Some(tracing_opentelemetry::layer().with_tracer(tracer)),
            None,
        ),
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    if let Some(e) = otel_error {
        tracing::warn!("traces are not exported: {e}");
    }
}

/// The OTLP tracer when an endpoint is configured.
fn otlp_tracer() -> anyhow::Result<Option<opentelemetry_sdk::trace::Tracer>> {
    use opentelemetry::trace::TracerProvider;
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !configured || disabled {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "outbox".into());
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the program name (the SDK reads them).
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(program);
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("outbox-operator");
    let _ = TRACER_PROVIDER.set(provider);
    Ok(Some(tracer))
}

/// Flushes and stops the trace export (no-op when traces are not exported).
pub fn shutdown_tracing() {
    if let Some(p) = TRACER_PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

/// Runs `body` on a multi-threaded runtime and maps its result to an exit code: 0, 2 for a
/// [`ConfigError`] (one line), 1 for anything else (the error chain on one line).
pub fn exit_code(
    program: &str,
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(body);
    shutdown_tracing();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT. Call inside a Tokio runtime.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight work");
        t.cancel();
    });
    token
}

#[cfg(feature = "database")]
/// Parses a PostgreSQL URL from `flag`/`env`; a missing or malformed one is a [`ConfigError`].
pub fn database_options(
    url: Option<&str>,
    flag: &'static str,
    env: &'static str,
) -> anyhow::Result<PgConnectOptions> {
    let url = url.ok_or_else(|| config_error(flag, env, "is required"))?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(config_error(
            flag,
            env,
            "must start with postgres:// or postgresql://",
        ));
    }
    PgConnectOptions::from_str(url).map_err(|e| config_error(flag, env, e))
}

/// Checks a Kafka bootstrap list (`host:port,...`) and `key=value` librdkafka properties, refusing those
/// the guarantees of `process` rest on ([`contract::kafka_guard`]).
pub fn kafka_settings(
    brokers: &str,
    brokers_flag: (&'static str, &'static str),
    extra: &[String],
    extra_flag: (&'static str, &'static str),
    process: contract::kafka_guard::Process,
) -> anyhow::Result<Vec<(String, String)>> {
    if brokers.trim().is_empty() {
        return Err(config_error(brokers_flag.0, brokers_flag.1, "is empty"));
    }
    for b in brokers.split(',') {
        let port = b.trim().rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        if !matches!(port, Some(Ok(p)) if p > 0) {
            return Err(config_error(
                brokers_flag.0,
                brokers_flag.1,
                format!("`{b}` is not host:port"),
            ));
        }
    }
    extra
        .iter()
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| {
                    config_error(
                        extra_flag.0,
                        extra_flag.1,
                        format!("`{kv}` is not key=value"),
                    )
                })?;
            if let Some(why) = contract::kafka_guard::refusal(process, &k, &v) {
                return Err(config_error(extra_flag.0, extra_flag.1, why));
            }
            Ok((k, v))
        })
        .collect()
}

#[cfg(feature = "database")]
/// Waits until the database answers, logging one line per failed attempt with growing backoff.
/// `false` when `shutdown` fired first. Probes with a direct connection: a pool would retry silently
/// until its acquire timeout.
pub async fn wait_for_database(opts: &PgConnectOptions, shutdown: &CancellationToken) -> bool {
    use sqlx::Connection;
    retry_until("database", shutdown, || async {
        let conn = sqlx::PgConnection::connect_with(opts).await?;
        conn.close().await
    })
    .await
}

#[cfg(feature = "database")]
/// Whether the database answers `SELECT 1` within two seconds (readiness probes).
pub async fn database_answers(pool: &sqlx::PgPool) -> bool {
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(pool),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

#[cfg(feature = "database")]
/// Reports [`database_answers`] to `report` every `every` until `stop`.
pub async fn watch_database(
    pool: sqlx::PgPool,
    every: std::time::Duration,
    stop: CancellationToken,
    report: impl Fn(bool),
) {
    loop {
        report(database_answers(&pool).await);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Calls `attempt_once` until it succeeds (`true`) or `shutdown` fires (`false`), logging each failure
/// with the backoff before the next try (0.5 s doubling, at most 30 s).
pub async fn retry_until<F, Fut, E>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt_once: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut attempt = 0u32;
    loop {
        let Err(e) = attempt_once().await else {
            return true;
        };
        attempt += 1;
        let wait = crate::backoff::exponential(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(30),
            attempt,
        );
        tracing::warn!("{what} unreachable (attempt {attempt}): {e}; retrying in {wait:?}");
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "database")]
    fn bad_database_urls_name_the_flag_and_the_env_var() {
        let e = database_options(Some("mysql://x"), "--database-url", "DATABASE_URL").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --database-url (DATABASE_URL): must start with postgres:// or postgresql://"
        );
        assert!(database_options(None, "--database-url", "DATABASE_URL")
            .unwrap_err()
            .to_string()
            .ends_with("is required"));
    }

    #[test]
    fn bad_kafka_settings_name_the_flag_and_the_env_var() {
        let b = ("--brokers", "KAFKA_BOOTSTRAP");
        let x = ("--kafka-config", "KAFKA_CONFIG");
        use contract::kafka_guard::Process::{Consumer, Relay};
        assert!(kafka_settings("localhost", b, &[], x, Relay)
            .unwrap_err()
            .to_string()
            .contains("`localhost` is not host:port"));
        assert!(kafka_settings("h:1", b, &["nonsense".into()], x, Relay)
            .unwrap_err()
            .to_string()
            .starts_with("invalid --kafka-config (KAFKA_CONFIG)"));
        assert_eq!(
            kafka_settings("h:1,g:2", b, &["a = b".into(), "".into()], x, Relay).unwrap(),
            vec![("a".to_owned(), "b".to_owned())]
        );
        assert_eq!(
            kafka_settings("h:1", b, &["acks=1".into()], x, Relay)
                .unwrap_err()
                .to_string(),
            "invalid --kafka-config (KAFKA_CONFIG): `acks` is set by the relay (acks=all: nothing lost rests on it); it cannot be overridden"
        );
        assert!(kafka_settings("h:1", b, &["acks=1".into()], x, Consumer).is_ok());
        assert!(kafka_settings(
            "h:1",
            b,
            &["enable.auto.offset.store=true".into()],
            x,
            Consumer
        )
        .is_err());
    }
}
