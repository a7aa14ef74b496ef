//! `outbox-operator` binary: all logic lives in the library (`operator::cli`).
fn main() -> std::process::ExitCode {
    operator::cli::main()
}
