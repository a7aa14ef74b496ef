//! `demo-consumer --role pharmacy|notification`: the demo's two consumer groups.

use clap::Parser;
use consumer_runtime::cli::{serve, ConsumerArgs};
use demo_consumer::{self as demo, DemoHandler, Role};
use process_kit::service::{exit_code, init_logging};

/// A demo consumer: writes one `demo.pharmacy_orders` or `demo.notifications` row per order.
#[derive(Debug, Parser)]
#[command(name = "demo-consumer", version, about)]
struct Cli {
    /// Which service to be; also the default consumer group.
    #[arg(long, env = "DEMO_ROLE", value_enum)]
    role: Role,
    #[command(flatten)]
    consumer: ConsumerArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.consumer.log_format);
    exit_code(
        "demo-consumer",
        serve(
            cli.consumer,
            Some(cli.role.group_id()),
            DemoHandler(cli.role),
            |pool| async move { Ok(demo::migrate(&pool).await?) },
        ),
    )
}
