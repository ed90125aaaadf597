//! Logs and traces, set up the same way in every binary.
//!
//! Logs are JSON lines (or human-readable text for local work). Spans always carry
//! OpenTelemetry trace ids, so a request can be followed even when nothing is exported;
//! spans are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::{str::FromStr, time::Duration};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

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

/// Installs the global subscriber, tracer provider and W3C trace-context propagator.
/// Call once, from `main`, inside the Tokio runtime (the OTLP exporter needs it).
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
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
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?,
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init()?,
    }
    Ok(TelemetryGuard { provider })
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
