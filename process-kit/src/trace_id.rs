//! Trace ids in log lines. A span that declares `trace_id = tracing::field::Empty` and is passed to
//! [`record_trace_id`] carries its OpenTelemetry trace id as a field, so every log line inside it — JSON
//! logs print the current span's fields — says which trace it belongs to. The id exists when traces are
//! exported (the OpenTelemetry layer assigns it) or when the span continues a remote parent (a consumer's
//! event `traceparent`); otherwise the field stays empty and is not printed.

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Records `span`'s trace id into its `trace_id` field (a no-op when it has none or no such field).
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", sc.trace_id().to_string());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects what the JSON formatter writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_log_lines_inside_the_span_carry_its_trace_id() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("work", trace_id = tracing::field::Empty);
            record_trace_id(&span);
            let _in = span.enter();
            tracing::info!("inside");
        });
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        let id = line["span"]["trace_id"].as_str().unwrap_or_default();
        assert_eq!(id.len(), 32, "{out}");
        assert_ne!(id, "0".repeat(32));
    }

    #[test]
    fn without_a_trace_the_field_stays_empty() {
        let span = tracing::info_span!("work", trace_id = tracing::field::Empty);
        record_trace_id(&span); // no subscriber, no OpenTelemetry layer: nothing to record, no panic
    }
}
