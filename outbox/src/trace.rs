//! Captures the active W3C trace context into event headers.

use std::collections::BTreeMap;

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds `traceparent` (and `tracestate` when non-empty) from the current tracing span's OpenTelemetry
/// context, unless the caller set them. The header format is the W3C one, written directly: pulling in
/// the SDK's propagator for one line of formatting is not worth the dependency in every application.
/// The span context a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`) names, as a remote parent;
/// `None` for anything malformed or all-zero. Consumers continue the trace from it, the relay links to it.
pub fn parse_traceparent(header: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut parts = header.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

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

#[cfg(test)]
mod tests {
    use super::parse_traceparent;

    #[test]
    fn a_w3c_traceparent_parses_to_a_remote_sampled_context() {
        let sc =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
    }

    #[test]
    fn malformed_or_zero_headers_are_ignored() {
        for bad in [
            "",
            "00-x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
