//! Sends one span to `OTEL_EXPORTER_OTLP_ENDPOINT` the way every binary exports (a manual check of an
//! endpoint: `cargo run -p process-kit --example otlp_probe`). With `PROBE_NO_FLUSH=1` it
//! waits 3 s and exits without flushing, which shows whether the periodic export runs.
fn main() {
    process_kit::service::init_logging(process_kit::service::LogFormat::Text);
    {
        let _s = tracing::info_span!("probe").entered();
        tracing::info!("inside");
    }
    if std::env::var_os("PROBE_NO_FLUSH").is_some() {
        std::thread::sleep(std::time::Duration::from_secs(3));
        std::process::exit(0);
    }
    process_kit::service::shutdown_tracing();
}
