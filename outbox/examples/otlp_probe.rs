//! Sends one span to `OTEL_EXPORTER_OTLP_ENDPOINT` the way every binary exports (a manual check of an
//! endpoint: `cargo run -p outbox --features surfaces --example otlp_probe`). With `PROBE_NO_FLUSH=1` it
//! waits 3 s and exits without flushing, which shows whether the periodic export runs.
fn main() {
    outbox::service::init_logging(outbox::service::LogFormat::Text);
    {
        let _s = tracing::info_span!("probe").entered();
        tracing::info!("inside");
    }
    if std::env::var_os("PROBE_NO_FLUSH").is_some() {
        std::thread::sleep(std::time::Duration::from_secs(3));
        std::process::exit(0);
    }
    outbox::service::shutdown_tracing();
}
