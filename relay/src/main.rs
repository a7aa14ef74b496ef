//! `outbox-relay` binary: all logic lives in the library (`relay::cli`).
fn main() -> std::process::ExitCode {
    relay::cli::main()
}
