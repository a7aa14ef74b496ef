//! Captures the active W3C trace context into event headers.

use std::collections::BTreeMap;

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds `traceparent` (and `tracestate` when non-empty) from the current tracing span's OpenTelemetry
/// context, unless the caller set them. The header format is the W3C one, written directly: pulling in
/// the SDK's propagator for one line of formatting is not worth the dependency in every application.
pub(crate) fn capture_traceparent(headers: &mut BTreeMap<String, String>) {
    if headers.contains_key("traceparent") {
        return;
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        "traceparent".into(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert("tracestate".into(), state);
    }
}
