//! Logs and traces, set up the same way in every binary.
//!
//! Logs are JSON lines (or human-readable text for local work). Spans always carry
//! OpenTelemetry trace ids, so a request can be followed even when nothing is exported;
//! spans are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Every
//! line logged inside a span carries `trace_id` and `span_id`, so logs and traces join.

use std::{str::FromStr, time::Duration};

use opentelemetry::{
    KeyValue,
    trace::{SpanId, TraceContextExt as _, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::Env;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            other => Err(format!("`{other}` is not a log format; use json or text")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the resource, e.g. `auth`.
    pub service_name: &'static str,
    /// `service.instance.id`: `<PREFIX>_INSTANCE_ID`, else the host name, else a random id.
    pub instance_id: String,
    /// `<PREFIX>_LOG_FORMAT`: `json` (default) or `text`.
    pub log_format: LogFormat,
    /// `<PREFIX>_LOG`: an `EnvFilter` directive such as `info,sqlx=warn`.
    pub log_filter: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans go; unset, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `<PREFIX>_TRACE_SAMPLE_RATIO`: the share of new traces sampled; a request that
    /// arrives with a sampled parent is always sampled (parent-based).
    pub sample_ratio: f64,
}

impl TelemetryConfig {
    pub const DEFAULT_LOG_FILTER: &'static str = "info,sqlx=warn,h2=warn,tower=warn,hyper=warn";

    pub fn from_env(env: &Env, service_name: &'static str) -> Self {
        let sample_ratio = env.or("TRACE_SAMPLE_RATIO", 1.0_f64);
        if !(0.0..=1.0).contains(&sample_ratio) {
            env.problem(
                &env.name("TRACE_SAMPLE_RATIO"),
                format!("{sample_ratio} is outside 0.0..=1.0"),
            );
        }
        Self {
            service_name,
            instance_id: env
                .optional("INSTANCE_ID")
                .or_else(|| env.unprefixed("HOSTNAME"))
                .unwrap_or_else(|| format!("{service_name}-{}", std::process::id())),
            log_format: env.or("LOG_FORMAT", LogFormat::Json),
            log_filter: env.or("LOG", Self::DEFAULT_LOG_FILTER.to_owned()),
            otlp_endpoint: env.unprefixed("OTEL_EXPORTER_OTLP_ENDPOINT"),
            sample_ratio,
        }
    }
}

/// Keeps the tracer provider alive; dropping it flushes spans still buffered.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "flushing spans at exit failed");
        }
    }
}

/// Installs the global subscriber, tracer provider and W3C trace-context propagator, with
/// logs on stdout. Call once, from `main`, inside the Tokio runtime (the OTLP exporter needs
/// it).
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    init_with_writer(config, std::io::stdout)
}

/// [`init`] with logs going to `writer`: tests pass `std::io::sink` to keep spans and trace
/// ids without the noise.
pub fn init_with_writer<W>(config: &TelemetryConfig, writer: W) -> anyhow::Result<TelemetryGuard>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let resource = Resource::builder()
        .with_service_name(config.service_name)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", config.instance_id.clone()),
        ])
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))));
    if config.otlp_endpoint.is_some() {
        // The exporter reads the endpoint, headers and timeout from the standard OTEL_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(config.service_name);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let filter = EnvFilter::try_new(&config.log_filter)?;
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(log_layer(config.log_format, writer))
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The layer that writes log lines, each carrying the trace and span ids of the span it
/// was emitted in. It must sit above the OpenTelemetry layer, which gives spans their ids.
fn log_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(|inner| WithTraceIds { inner, json: true })
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .map_event_format(|inner| WithTraceIds { inner, json: false })
            .with_writer(writer)
            .boxed(),
    }
}

/// Adds `trace_id` and `span_id` of the current OpenTelemetry span to each line that `inner`
/// formats, so logs and traces join on the trace id.
///
/// The ids come from the OpenTelemetry context the tracing layer activates when a span is
/// entered, so they are the ids exported spans carry (including a parent set from an
/// incoming `traceparent`). JSON lines get them as the first two keys (the inner line is
/// formatted to a buffer and spliced, keeping every other key the stock formatter writes);
/// text lines get them as a prefix, written straight through so colours survive.
#[derive(Debug)]
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = current_ids() else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(writer, r#"{{"trace_id":"{trace_id}","span_id":"{span_id}""#)?;
                if !rest.starts_with('}') {
                    writer.write_char(',')?;
                }
                writer.write_str(rest)
            }
            // Not a JSON object after all: leave the line as it is.
            None => writer.write_str(&line),
        }
    }
}

/// The ids of the OpenTelemetry span active on this thread, when there is one.
fn current_ids() -> Option<(TraceId, SpanId)> {
    let context = opentelemetry::Context::current();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| (span_context.trace_id(), span_context.span_id()))
}

/// The trace id of the current span as 32 hex digits, when it has one.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "tests: fail loudly"
    )]

    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

    /// Log output kept in memory.
    #[derive(Debug, Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Logs, in `format`, an event inside a span whose parent came from a caller (as a
    /// server span's does), and one outside any span. Returns the lines and the span's id.
    fn log_inside_and_outside_a_span(format: LogFormat) -> (Vec<String>, String) {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(log_layer(format, move || writer.clone()));
        let span_id = tracing::subscriber::with_default(subscriber, || {
            let caller = SpanContext::new(
                TraceId::from_hex(TRACE_ID).unwrap(),
                SpanId::from_hex(PARENT_SPAN_ID).unwrap(),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            );
            let span = tracing::info_span!("request", user = "u1");
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(caller))
                .unwrap();
            let span_id = span.in_scope(|| {
                tracing::info!(answer = 42, "inside");
                tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .span_id()
            });
            tracing::info!("outside");
            span_id
        });
        (buffer.lines(), span_id.to_string())
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_the_current_span() {
        let (lines, span_id) = log_inside_and_outside_a_span(LogFormat::Json);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let inside: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(inside["trace_id"], TRACE_ID, "{inside}");
        assert_eq!(inside["span_id"], span_id.as_str(), "{inside}");
        assert_ne!(
            span_id, PARENT_SPAN_ID,
            "the line names its own span, not the caller's"
        );
        // Everything the stock JSON formatter writes is still there.
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["answer"], 42);
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["span"]["name"], "request");
        assert_eq!(inside["span"]["user"], "u1");
        assert!(inside["timestamp"].is_string());

        let outside: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(outside["message"], "outside");
        assert!(outside.get("trace_id").is_none(), "{outside}");
    }

    #[test]
    fn text_lines_start_with_the_ids() {
        let (lines, span_id) = log_inside_and_outside_a_span(LogFormat::Text);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let prefix = format!("trace_id={TRACE_ID} span_id={span_id} ");
        assert!(lines[0].starts_with(&prefix), "{}", lines[0]);
        assert!(lines[0].contains("inside"), "{}", lines[0]);
        assert!(!lines[1].contains("trace_id="), "{}", lines[1]);
    }
}
