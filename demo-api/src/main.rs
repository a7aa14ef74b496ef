//! `demo-api` binary: see the crate docs.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = demo_api::cli::Cli::parse();
    process_kit::service::init_logging(cli.log_format);
    process_kit::service::exit_code("demo-api", demo_api::cli::run(cli))
}
