//! `outbox-demo` (run by `make demo`): the whole pipeline on this machine, supervised, until Ctrl-C.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use e2e::ledger::{latency_ms, ledger};
use e2e::stack::{Options, Stack};

/// Starts PostgreSQL (or uses DATABASE_URL), a Kafka-protocol broker (or KAFKA_BOOTSTRAP), the relay, two
/// pharmacy consumers, one notification consumer and the demo API; prints where they are.
#[derive(Debug, Parser)]
#[command(name = "outbox-demo", version, about)]
struct Cli {
    /// Post this many orders once everything is ready, then print a report.
    #[arg(long, env = "LOAD", default_value_t = 0)]
    load: usize,
    /// Requests in flight while posting the load.
    #[arg(long, env = "LOAD_CONCURRENCY", default_value_t = 16)]
    load_concurrency: usize,
    /// Use this PostgreSQL database instead of a throwaway one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Use this Kafka instead of the embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    kafka_bootstrap: Option<String>,
    /// Port of the demo API.
    #[arg(long, env = "DEMO_API_PORT", default_value_t = 8080)]
    api_port: u16,
    /// Partitions of the orders topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Stop after the load report instead of running until Ctrl-C.
    #[arg(long)]
    exit_after_load: bool,
}

fn banner(stack: &Stack) {
    let api = &stack.api;
    let ports: Vec<String> = stack
        .procs
        .values()
        .filter(|p| p.spec.name != "api")
        .map(|p| {
            format!(
                "  {:<15} http://127.0.0.1:{}/metrics",
                p.spec.name, p.spec.http_port
            )
        })
        .collect();
    let lines = [
        String::new(),
        "=== outbox demo is running ===".into(),
        format!("  database        {}", stack.database_url),
        format!("  kafka           {}", stack.bootstrap),
        format!("  demo API        {api}"),
        ports.join("\n"),
        String::new(),
        "Try:".into(),
        format!("  curl -s -XPOST {api}/orders -H 'content-type: application/json' \\"),
        r#"      -d '{"customer":"ann","items":[{"sku":"aspirin-500","quantity":2}]}'"#.into(),
        format!("  curl -s {api}/orders/<order id>"),
        format!("  curl -s {api}/events/<event id>     # receipt: published where, consumed by whom"),
        format!("  curl -s -XPOST {api}/messages -H 'content-type: application/json' \\"),
        r#"      -d '{"topic":"orders","key":"k1","payload":{"hello":"world"}}'"#.into(),
        format!("  curl -s -XPOST '{api}/orders?crash=after-commit' -H 'content-type: application/json' -d '...'"),
        "      # the API exits right after the commit; the event is still delivered".into(),
        format!("  curl -s {api}/readyz"),
        String::new(),
        "Ctrl-C stops everything and removes the temporary data.".into(),
    ];
    println!("{}", lines.join("\n"));
}

/// Posts the load, waits until both groups consumed it, prints the report.
async fn load(stack: &Stack, n: usize, concurrency: usize) -> anyhow::Result<()> {
    let before = ledger(&stack.pool).await?.orders;
    let started = Instant::now();
    e2e::load::post_orders(&stack.api, n, concurrency, true).await?;
    let posted = started.elapsed();
    let bar = indicatif::ProgressBar::new(2 * (before as u64 + n as u64));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} effects")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("consuming");
    let deadline = Instant::now() + Duration::from_secs(300);
    let l = loop {
        let l = ledger(&stack.pool).await?;
        bar.set_position((l.pharmacy.exactly_once + l.notification.exactly_once) as u64);
        if l.complete() || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish_and_clear();
    let done = started.elapsed();
    let published: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM outbox.archive")
        .fetch_one(&stack.pool)
        .await?;
    let inbox = |g: &'static str| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox.inbox WHERE group_id = $1")
                .bind(g)
                .fetch_one(&pool)
                .await
        }
    };
    let duplicates = stack
        .metric_sum("pharmacy", "outbox_consumer_duplicates_skipped_total")
        .await
        + stack
            .metric_sum("notification", "outbox_consumer_duplicates_skipped_total")
            .await;
    let lat = latency_ms(&stack.pool, &[0.5, 0.99]).await?;
    let rows = [
        format!(
            "orders                  {:>10}   ({n} posted in {posted:.1?}, {:.0}/s)",
            l.orders,
            n as f64 / posted.as_secs_f64()
        ),
        format!("events published        {published:>10}"),
        format!(
            "consumed: pharmacy      {:>10}   (exactly once: {}, missing: {}, duplicated: {})",
            inbox("pharmacy").await?,
            l.pharmacy.exactly_once,
            l.pharmacy.missing,
            l.pharmacy.duplicated
        ),
        format!(
            "consumed: notification  {:>10}   (exactly once: {}, missing: {}, duplicated: {})",
            inbox("notification").await?,
            l.notification.exactly_once,
            l.notification.missing,
            l.notification.duplicated
        ),
        format!("duplicates skipped      {duplicates:>10}"),
        format!(
            "end-to-end latency      p50 {:.1} ms, p99 {:.1} ms   (order commit -> effect commit)",
            lat[0], lat[1]
        ),
        format!("all consumed after      {done:.1?}"),
    ];
    println!();
    for r in rows {
        println!("  {r}");
    }
    println!();
    if !l.complete() || !l.no_duplicates() {
        anyhow::bail!("the ledger does not balance: {l:?}");
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    println!("starting the outbox demo (PostgreSQL, broker, relay, 3 consumers, API) ...");
    let opts = Options {
        database_url: cli.database_url.clone(),
        kafka_bootstrap: cli.kafka_bootstrap.clone(),
        partitions: cli.partitions,
        echo: true,
        api_port: cli.api_port,
        allow_crash: true,
        ..Options::default()
    };
    let mut stack = Stack::start(opts).await.context("starting the stack")?;
    banner(&stack);
    let mut result = Ok(());
    if cli.load > 0 {
        result = load(&stack, cli.load, cli.load_concurrency).await;
    }
    if !cli.exit_after_load {
        supervise(&mut stack).await;
    }
    println!("stopping ...");
    for (name, status) in stack.stop().await {
        match status {
            Some(s) if s.success() => println!("  {name:<15} stopped"),
            Some(s) => println!("  {name:<15} {s}"),
            None => println!("  {name:<15} status unknown"),
        }
    }
    drop(stack);
    println!("temporary data removed. bye.");
    result
}

/// Reports children that exit on their own (they are not restarted) until SIGINT/SIGTERM.
async fn supervise(stack: &mut Stack) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (name, status) in stack.exited() {
                    if reported.insert(name.clone()) {
                        eprintln!("!!! {name} exited ({status}); not restarted. Its last lines are above.");
                    }
                }
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
