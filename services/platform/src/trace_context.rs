//! W3C trace context (`traceparent`, `tracestate`) carried in HTTP headers and gRPC metadata,
//! so one request is one trace across every hop.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace context found in `headers`; without one, the root of a
/// new trace.
pub fn set_parent_from(span: &tracing::Span, headers: &HeaderMap) {
    // From an empty context, not `extract`'s default of the current one: a server span
    // started while some other span is entered (a connection task's, a test's) must not
    // become that span's child when the caller sent no trace context.
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract_with_context(&opentelemetry::Context::new(), &HeaderExtractor(headers))
    });
    // Fails only when the span is disabled; then there is nothing to link.
    let _ = span.set_parent(parent);
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    inject_context(&tracing::Span::current().context(), headers);
}

/// Writes `span`'s trace context into `headers`, so the receiver's span becomes its child.
/// A span the log filter disabled has no context of its own: then the current span's is
/// sent, so the trace still continues past a filtered-out hop.
pub fn inject_from(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        inject_current(headers);
    } else {
        inject_context(&span.context(), headers);
    }
}

fn inject_context(context: &opentelemetry::Context, headers: &mut HeaderMap) {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(context, &mut HeaderInjector(headers));
    });
}
