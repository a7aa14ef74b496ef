//! `outbox-soak` (run by `make soak`): the chaos soak. Prints the ledger line; exits 1 on any violation.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use e2e::chaos::Bounds;
use e2e::soak::{run, Coordination, SoakOptions};
use e2e::stack::Kafka;

/// The demo stack under a steady order load while a seeded driver kills, pauses and restarts its parts.
#[derive(Debug, Parser)]
#[command(name = "outbox-soak", version, about)]
struct Cli {
    /// Orders to post.
    #[arg(long, env = "SOAK_ORDERS", default_value_t = 100_000)]
    orders: usize,
    /// Seed of the fault schedule (default: from the clock; printed either way).
    #[arg(long, env = "SOAK_SEED")]
    seed: Option<u64>,
    /// Orders per second the load aims at.
    #[arg(long, env = "SOAK_RATE", default_value_t = 400.0)]
    rate: f64,
    /// Shortest quiet time between faults.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    min_wait: Duration,
    /// Longest quiet time between faults.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// Longest outage (broker) or time down (killed processes).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    max_hold: Duration,
    /// Relay coordination: lease on the test bed's control plane, single (advisory lock), or auto.
    #[arg(long, value_enum, default_value = "auto")]
    coordination: Mode,
    /// Print every process's log lines.
    #[arg(long)]
    echo: bool,
    /// The broker: Apache Kafka (`make setup` caches it) or tansu behind a proxy.
    #[arg(long, value_enum, default_value = "apache")]
    kafka: Broker,
    /// Apache Kafka nodes (1 or 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    brokers: u8,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Broker {
    Apache,
    Tansu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Lease,
    Single,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let opts = SoakOptions {
        orders: cli.orders,
        seed,
        rate: cli.rate,
        bounds: Bounds {
            min_wait: cli.min_wait,
            max_wait: cli.max_wait,
            max_hold: cli.max_hold,
        },
        coordination: match cli.coordination {
            Mode::Auto => Coordination::Auto,
            Mode::Lease => Coordination::Lease,
            Mode::Single => Coordination::Single,
        },
        echo: cli.echo,
        kafka: match cli.kafka {
            Broker::Apache => Kafka::Apache(usize::from(cli.brokers)),
            Broker::Tansu => Kafka::ProxiedTansu,
        },
        ..SoakOptions::default()
    };
    println!("soak: seed={seed} (rerun with --seed {seed} to replay this fault schedule)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(opts)) {
        Ok(report) => {
            println!("{}", report.line());
            let violations = report.violations();
            if violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("soak: guarantees broken: {}", violations.join("; "));
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("soak: could not run: {e:#}");
            ExitCode::from(2)
        }
    }
}
