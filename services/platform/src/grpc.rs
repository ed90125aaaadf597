//! gRPC plumbing shared by servers and clients: one span and one set of metrics per RPC on
//! both sides, joined to the caller's trace, and lazily connected client channels that carry
//! the trace context onward.
//!
//! A gRPC status travels in one of two places: in the response headers when the server fails
//! before sending anything (a "trailers-only" response, how tonic answers most errors), or
//! in the trailers after the last message (every OK, and errors of streams already under
//! way). [`ServerLayer`] and [`Traced`] read the headers first and otherwise watch the body
//! until its trailers pass, so the span and the metrics end when the RPC does, streams
//! included. An RPC dropped before its status counts as `DEADLINE_EXCEEDED` when its
//! `grpc-timeout` has passed (tonic cut it), else as `CANCELLED` (the caller went away).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as _, Frame, SizeHint};
use metrics::SharedString;
use opentelemetry::trace::TraceContextExt as _;
use prost::Message as _;
use tonic::{
    Code,
    body::Body,
    transport::{Channel, Endpoint},
};
use tracing::{Instrument as _, Level, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::trace_context;

/// Response header carrying the trace id of the server span (32 hex digits), so a caller
/// (grpcurl, another team's service) can quote it without reading the logs.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");

/// Probes hit it every few seconds: its spans are at DEBUG so the default filter keeps them
/// out of logs and traces, while its metrics are recorded like any other RPC's.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The metric label (and span name) of a path the server does not serve.
const OTHER: &str = "_OTHER";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The labels of one RPC: `rpc.service`, `rpc.method` and the span name `service/method`.
#[derive(Debug, Clone)]
struct MethodLabels {
    service: SharedString,
    method: SharedString,
    full: SharedString,
}

impl MethodLabels {
    fn other() -> Self {
        Self {
            service: SharedString::const_str(OTHER),
            method: SharedString::const_str(OTHER),
            full: SharedString::const_str(OTHER),
        }
    }

    /// Labels straight from the path, for calls this process makes (its own code picks them).
    fn from_path(path: &str) -> Self {
        let full = path.trim_start_matches('/');
        let (service, method) = full.split_once('/').unwrap_or((full, ""));
        Self {
            service: SharedString::from_owned(service.to_owned()),
            method: SharedString::from_owned(method.to_owned()),
            full: SharedString::from_owned(full.to_owned()),
        }
    }

    fn is_health(&self) -> bool {
        &*self.service == HEALTH_SERVICE
    }
}

/// The methods a server answers, read from descriptor sets. Any other path gets the labels
/// `_OTHER`, so a scanner probing random paths cannot grow the metrics without bound.
#[derive(Debug, Clone, Default)]
pub struct KnownMethods {
    by_path: Arc<HashMap<String, MethodLabels>>,
}

impl KnownMethods {
    /// The methods of each of `services` (fully-qualified names) found in `descriptor_sets`
    /// (encoded `FileDescriptorSet`s).
    pub fn from_descriptor_sets(
        descriptor_sets: &[&[u8]],
        services: &[&str],
    ) -> Result<Self, prost::DecodeError> {
        let mut by_path = HashMap::new();
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set)?;
            for file in set.file {
                let package = file.package().to_owned();
                for service in file.service {
                    let name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    if !services.contains(&name.as_str()) {
                        continue;
                    }
                    let service_label = SharedString::from(Arc::<str>::from(name.as_str()));
                    for method in service.method {
                        let full = format!("{name}/{}", method.name());
                        let labels = MethodLabels {
                            service: service_label.clone(),
                            method: SharedString::from(Arc::<str>::from(method.name())),
                            full: SharedString::from(Arc::<str>::from(full.as_str())),
                        };
                        by_path.insert(full, labels);
                    }
                }
            }
        }
        Ok(Self {
            by_path: Arc::new(by_path),
        })
    }

    fn labels(&self, path: &str) -> MethodLabels {
        path.strip_prefix('/')
            .and_then(|full| self.by_path.get(full))
            .cloned()
            .unwrap_or_else(MethodLabels::other)
    }
}

/// Which end of the call a span and its metrics describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

impl Side {
    /// OpenTelemetry's gRPC conventions: a server span is an error only for codes that mean
    /// the server failed; `NOT_FOUND` or `INVALID_ARGUMENT` are the caller's business. A
    /// client span is an error for any code but OK.
    fn is_error(self, code: Code) -> bool {
        match self {
            Self::Server => matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ),
            Self::Client => code != Code::Ok,
        }
    }

    fn metric_names(self) -> (&'static str, &'static str) {
        match self {
            Self::Server => ("rpc_server_requests_total", "rpc_server_duration_seconds"),
            Self::Client => ("rpc_client_requests_total", "rpc_client_duration_seconds"),
        }
    }
}

/// One RPC in flight: its span, its labels and its start. Recorded exactly once, by
/// [`Observation::finish`] or, for an RPC dropped before its status, by `Drop`.
#[derive(Debug)]
struct Observation {
    side: Side,
    labels: MethodLabels,
    span: tracing::Span,
    started: Instant,
    /// From the caller's `grpc-timeout`. tonic enforces it outside this layer by dropping the
    /// call and answering DEADLINE_EXCEEDED itself; the deadline tells that drop apart from
    /// a caller who went away (CANCELLED).
    deadline: Option<Instant>,
    done: bool,
}

impl Observation {
    fn start(side: Side, labels: MethodLabels, span: tracing::Span, headers: &HeaderMap) -> Self {
        let started = Instant::now();
        Self {
            side,
            labels,
            span,
            started,
            deadline: grpc_timeout(headers).and_then(|timeout| started.checked_add(timeout)),
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        self.span.record("rpc.grpc.status_code", i32::from(code));
        if self.side.is_error(code) {
            self.span.record("otel.status_code", "ERROR");
            self.span.record("otel.status_description", code_name(code));
        }
        let (requests, duration) = self.side.metric_names();
        metrics::counter!(
            requests,
            "service" => self.labels.service.clone(),
            "method" => self.labels.method.clone(),
            "code" => code_name(code),
        )
        .increment(1);
        metrics::histogram!(
            duration,
            "service" => self.labels.service.clone(),
            "method" => self.labels.method.clone(),
        )
        .record(elapsed);
    }

    /// Finishes now when the headers carry the status; otherwise hands the observation to
    /// the body, which finishes it when the trailers pass.
    fn watch(mut self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.finish(code);
            return response;
        }
        response.map(|inner| {
            Body::new(ObservedBody {
                inner,
                observation: self,
            })
        })
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        let code = if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            Code::DeadlineExceeded
        } else {
            Code::Cancelled
        };
        self.finish(code);
    }
}

/// A response body that finishes its RPC's observation when the status passes by.
#[derive(Debug)]
struct ObservedBody {
    inner: Body,
    observation: Observation,
}

impl http_body::Body for ObservedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // A server stream produces its messages while the body is polled: inside the span,
        // their log lines carry the RPC's trace id.
        let polled = {
            let _entered = this.observation.span.enter();
            Pin::new(&mut this.inner).poll_frame(cx)
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.observation
                        .finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(status))) => this.observation.finish(status.code()),
            // A gRPC body that ends without trailers broke the protocol.
            Poll::Ready(None) => this.observation.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // Dropped while more was to come: the peer stopped reading (CANCELLED, from the
        // observation's own drop). Dropped empty, with no status anywhere: broken response.
        if self.inner.is_end_stream() {
            self.observation.finish(Code::Unknown);
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// The `grpc-timeout` of a request: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`), as the gRPC over HTTP/2 spec has it.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The canonical name of a code, as `grpcurl` and the gRPC docs spell it; the metric label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One span per RPC. The level is a constant of each call site, hence the macro.
macro_rules! rpc_span {
    ($level:expr, $name:literal, $kind:literal, $labels:expr $(, $parent:tt)?) => {
        tracing::span!(
            $(parent: $parent,)?
            $level,
            $name,
            otel.name = %$labels.full,
            otel.kind = $kind,
            rpc.system = "grpc",
            rpc.service = %$labels.service,
            rpc.method = %$labels.method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        )
    };
}

/// The trace id of `span` as a header value, when it has one.
fn trace_id_header(span: &tracing::Span) -> Option<HeaderValue> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| HeaderValue::from_str(&span_context.trace_id().to_string()).ok())
        .flatten()
}

/// The server side, as a tower layer on `tonic::transport::Server`: a span per RPC, child
/// of the `traceparent` in the request metadata; `rpc_server_requests_total` and
/// `rpc_server_duration_seconds`; the trace id in the `x-trace-id` response header.
/// Requests that are not gRPC (a `/metrics` scrape on the same port) pass untouched.
#[derive(Debug, Clone)]
pub struct ServerLayer {
    known: KnownMethods,
}

impl ServerLayer {
    pub fn new(known: KnownMethods) -> Self {
        Self { known }
    }
}

impl<S> tower::Layer<S> for ServerLayer {
    type Service = ObservedServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObservedServer {
            inner,
            known: self.known.clone(),
        }
    }
}

/// The service [`ServerLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct ObservedServer<S> {
    inner: S,
    known: KnownMethods,
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for ObservedServer<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if !is_grpc(request.headers()) {
            return Box::pin(self.inner.call(request));
        }
        let labels = self.known.labels(request.uri().path());
        // `parent: None`: whatever span the connection task has open is not the caller;
        // the parent is what the caller sent, if anything.
        let span = if labels.is_health() {
            rpc_span!(Level::DEBUG, "rpc", "server", labels, None)
        } else {
            rpc_span!(Level::INFO, "rpc", "server", labels, None)
        };
        trace_context::set_parent_from(&span, request.headers());
        let trace_id = trace_id_header(&span);
        let observation = Observation::start(Side::Server, labels, span.clone(), request.headers());
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let mut response = future.instrument(span).await?;
            if let Some(trace_id) = trace_id {
                response.headers_mut().insert(TRACE_ID_HEADER, trace_id);
            }
            Ok(observation.watch(response))
        })
    }
}

/// The client side: a span per call (child of the current span, its context sent in the
/// metadata so the server's span becomes its child), `rpc_client_requests_total` and
/// `rpc_client_duration_seconds`.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// A channel that records and carries the trace of every call it sends.
pub type TracedChannel = Traced<Channel>;

impl<S> tower::Service<http::Request<Body>> for Traced<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let labels = MethodLabels::from_path(request.uri().path());
        let span = if labels.is_health() {
            rpc_span!(Level::DEBUG, "rpc.client", "client", labels)
        } else {
            rpc_span!(Level::INFO, "rpc.client", "client", labels)
        };
        trace_context::inject_from(&span, request.headers_mut());
        let mut observation =
            Observation::start(Side::Client, labels, span.clone(), request.headers());
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.instrument(span).await {
                Ok(response) => Ok(observation.watch(response)),
                Err(error) => {
                    observation.finish(error_code(&error));
                    Err(error)
                }
            }
        })
    }
}

/// The code a tonic client reports for a transport error (as `tonic::Status::from_error`
/// does, without consuming the error).
fn error_code(error: &(dyn std::error::Error + 'static)) -> Code {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(status) = error.downcast_ref::<tonic::Status>() {
            return status.code();
        }
        if error.is::<tonic::TimeoutExpired>() {
            return Code::Cancelled;
        }
        if error.is::<tonic::ConnectError>() {
            return Code::Unavailable;
        }
        source = error.source();
    }
    Code::Unknown
}

/// Client settings for calls to another service.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Default deadline per call when the caller sets none.
    pub request_timeout: Duration,
    /// How often a service name is resolved again to follow its replicas.
    pub resolve_interval: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            resolve_interval: Duration::from_secs(5),
        }
    }
}

/// The endpoint every client connection is built from: timeouts, no Nagle, keep-alive.
pub(crate) fn endpoint(
    url: &str,
    config: ClientConfig,
) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
}

/// A channel to `url` that connects on first use, so start-up order does not matter. When
/// the host is a name (a headless Service, say), calls are balanced per request across
/// every address it resolves to, followed as replicas come and go (see
/// [`crate::balance`]); an address literal is one connection. A comma-separated list of
/// URLs with address literals (`http://127.0.0.1:50052,http://127.0.0.1:51052`: replicas
/// on one machine) is balanced the same way over the listed replicas.
pub fn lazy_channel(
    url: &str,
    config: ClientConfig,
) -> Result<TracedChannel, tonic::transport::Error> {
    if url.contains(',') {
        let mut addresses = Vec::new();
        for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let uri = endpoint(part, config)?.uri().clone();
            if let Some(address) = uri
                .authority()
                .and_then(|a| a.as_str().parse::<std::net::SocketAddr>().ok())
            {
                addresses.push(address);
            }
        }
        let scheme = url.split("://").next().unwrap_or("http").trim().to_owned();
        if tokio::runtime::Handle::try_current().is_ok() {
            let target = crate::balance::Target {
                scheme,
                host: "replicas".to_owned(),
                port: 0,
            };
            let resolver = Arc::new(crate::balance::StaticResolver(addresses));
            return Ok(Traced::new(crate::balance::balanced(
                target, config, resolver,
            )));
        }
        let first = url.split(',').next().unwrap_or(url).trim();
        return Ok(Traced::new(endpoint(first, config)?.connect_lazy()));
    }
    lazy_channel_with(url, config, Arc::new(crate::balance::SystemResolver))
}

/// [`lazy_channel`] with the caller's resolver (tests stand replicas on loopback addresses
/// behind one).
pub fn lazy_channel_with(
    url: &str,
    config: ClientConfig,
    resolver: Arc<dyn crate::balance::Resolver>,
) -> Result<TracedChannel, tonic::transport::Error> {
    let endpoint = endpoint(url, config)?;
    let uri = endpoint.uri();
    let named_host = uri.host().filter(|host| {
        host.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_err()
    });
    match (named_host, tokio::runtime::Handle::try_current()) {
        (Some(host), Ok(_)) => {
            let target = crate::balance::Target {
                scheme: uri.scheme_str().unwrap_or("http").to_owned(),
                host: host.to_owned(),
                port: uri.port_u16().unwrap_or(80),
            };
            Ok(Traced::new(crate::balance::balanced(
                target, config, resolver,
            )))
        }
        _ => Ok(Traced::new(endpoint.connect_lazy())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "tests: fail loudly"
    )]

    use std::{
        collections::VecDeque,
        convert::Infallible,
        sync::{Arc, Mutex},
    };

    use opentelemetry::{
        Context as OtelContext, KeyValue, Value,
        trace::{SpanKind, Status, TracerProvider as _},
    };
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        propagation::TraceContextPropagator,
        trace::{SdkTracerProvider, SpanData, SpanProcessor},
    };
    use tonic::codegen::Bytes;
    use tower::{Layer as _, Service as _, ServiceExt as _};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
    const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

    /// Keeps every span that ends, for the test to inspect.
    #[derive(Debug, Clone, Default)]
    struct Collected(Arc<Mutex<Vec<SpanData>>>);

    impl SpanProcessor for Collected {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &OtelContext) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    /// What a test run recorded: the spans that ended and the metrics text.
    pub(crate) struct Recorded {
        pub(crate) spans: Vec<SpanData>,
        metrics: String,
    }

    impl Recorded {
        fn span(&self, name: &str) -> &SpanData {
            self.spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no span {name} among {:?}", self.spans))
        }
    }

    fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv: &&KeyValue| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    /// Runs `test` on a current-thread runtime with a tracing subscriber whose spans are
    /// collected and a metrics recorder of its own, so tests run in parallel unaffected.
    pub(crate) fn run<T, F: Future<Output = T>>(test: impl FnOnce() -> F) -> (T, Recorded) {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(collected.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let recorder = crate::metrics::build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let output = tracing::subscriber::with_default(subscriber, || {
            metrics::with_local_recorder(&recorder, || runtime.block_on(test()))
        });
        let spans = std::mem::take(&mut *collected.0.lock().unwrap());
        (
            output,
            Recorded {
                spans,
                metrics: handle.render(),
            },
        )
    }

    /// A body of given frames: data then, optionally, trailers.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn status_headers(code: Code) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from(i32::from(code)));
        headers
    }

    /// An OK unary response as tonic sends it: a message, then the status in trailers.
    fn ok_in_trailers() -> http::Response<Body> {
        let frames = VecDeque::from([
            Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])),
            Frame::trailers(status_headers(Code::Ok)),
        ]);
        http::Response::new(Body::new(Frames(frames)))
    }

    /// An error as tonic sends it: no body, the status in the headers ("trailers-only").
    fn trailers_only(code: Code) -> http::Response<Body> {
        let mut response = http::Response::new(Body::empty());
        *response.headers_mut() = status_headers(code);
        response
    }

    fn grpc_request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap()
    }

    fn known() -> KnownMethods {
        KnownMethods::from_descriptor_sets(
            &[
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            ],
            &[
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            ],
        )
        .unwrap()
    }

    /// A server whose handler answers every call with `respond()`.
    fn server(
        respond: fn() -> http::Response<Body>,
    ) -> ObservedServer<
        impl tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone,
    > {
        ServerLayer::new(known()).layer(tower::service_fn(move |_: http::Request<Body>| {
            std::future::ready(Ok::<_, Infallible>(respond()))
        }))
    }

    async fn drain(response: http::Response<Body>) {
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            frame.unwrap();
        }
    }

    #[test]
    fn a_server_span_continues_the_callers_trace_and_ends_with_the_status_in_trailers() {
        let (trace_header, recorded) = run(|| async {
            let mut request = grpc_request(REFLECTION);
            request.headers_mut().insert(
                "traceparent",
                HeaderValue::from_str(&format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")).unwrap(),
            );
            let response = server(ok_in_trailers).oneshot(request).await.unwrap();
            let trace_header = response.headers().get(&TRACE_ID_HEADER).cloned();
            drain(response).await;
            trace_header
        });

        let span = recorded.span("grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        assert_eq!(span.span_context.trace_id().to_string(), TRACE_ID);
        assert_eq!(span.parent_span_id.to_string(), PARENT_SPAN_ID);
        assert!(span.parent_span_is_remote);
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(attribute(span, "rpc.system"), Some(&Value::from("grpc")));
        assert_eq!(
            attribute(span, "rpc.service"),
            Some(&Value::from("grpc.reflection.v1.ServerReflection"))
        );
        assert_eq!(
            attribute(span, "rpc.method"),
            Some(&Value::from("ServerReflectionInfo"))
        );
        assert_eq!(
            attribute(span, "rpc.grpc.status_code"),
            Some(&Value::I64(0))
        );
        assert_eq!(span.status, Status::Unset);
        assert_eq!(
            trace_header.as_ref().and_then(|v| v.to_str().ok()),
            Some(TRACE_ID),
            "the response names the trace"
        );
        assert!(
            recorded.metrics.contains(
                r#"rpc_server_requests_total{service="grpc.reflection.v1.ServerReflection",method="ServerReflectionInfo",code="OK"} 1"#
            ),
            "{}",
            recorded.metrics
        );
        assert!(
            recorded.metrics.contains(
                r#"rpc_server_duration_seconds_count{service="grpc.reflection.v1.ServerReflection",method="ServerReflectionInfo"} 1"#
            ),
            "{}",
            recorded.metrics
        );
    }

    #[test]
    fn without_a_traceparent_the_server_span_starts_a_trace() {
        let ((), recorded) = run(|| async {
            let mut server = server(ok_in_trailers);
            server.ready().await.unwrap();
            // The call is made while another span is current, as in a connection task.
            let response =
                tracing::info_span!("unrelated").in_scope(|| server.call(grpc_request(REFLECTION)));
            drain(response.await.unwrap()).await;
        });
        let span = recorded.span("grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        assert_eq!(
            span.parent_span_id,
            opentelemetry::trace::SpanId::INVALID,
            "a root span, not a child of whatever span the server task had open"
        );
    }

    #[test]
    fn server_faults_mark_the_span_as_an_error_and_caller_faults_do_not() {
        let ((), recorded) = run(|| async {
            let internal = server(|| trailers_only(Code::Internal))
                .oneshot(grpc_request("/grpc.health.v1.Health/Check"))
                .await
                .unwrap();
            drain(internal).await;
            let not_found = server(|| trailers_only(Code::NotFound))
                .oneshot(grpc_request("/grpc.health.v1.Health/Watch"))
                .await
                .unwrap();
            drain(not_found).await;
        });

        let internal = recorded.span("grpc.health.v1.Health/Check");
        assert_eq!(
            attribute(internal, "rpc.grpc.status_code"),
            Some(&Value::I64(13))
        );
        assert!(
            matches!(internal.status, Status::Error { .. }),
            "{:?}",
            internal.status
        );
        let not_found = recorded.span("grpc.health.v1.Health/Watch");
        assert_eq!(
            attribute(not_found, "rpc.grpc.status_code"),
            Some(&Value::I64(5))
        );
        assert_eq!(not_found.status, Status::Unset);
        for line in [
            r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Check",code="INTERNAL"} 1"#,
            r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Watch",code="NOT_FOUND"} 1"#,
        ] {
            assert!(
                recorded.metrics.contains(line),
                "{line} in {}",
                recorded.metrics
            );
        }
    }

    #[test]
    fn paths_the_server_does_not_serve_share_one_label() {
        let ((), recorded) = run(|| async {
            for path in ["/scan.Me/Probe1", "/grpc.health.v1.Health/Probe2"] {
                let response = server(|| trailers_only(Code::Unimplemented))
                    .oneshot(grpc_request(path))
                    .await
                    .unwrap();
                drain(response).await;
            }
        });
        assert!(
            recorded.metrics.contains(
                r#"rpc_server_requests_total{service="_OTHER",method="_OTHER",code="UNIMPLEMENTED"} 2"#
            ),
            "{}",
            recorded.metrics
        );
        assert!(!recorded.metrics.contains("Probe"), "{}", recorded.metrics);
    }

    #[test]
    fn an_rpc_dropped_before_its_status_counts_as_cancelled_or_past_its_deadline() {
        let ((), recorded) = run(|| async {
            // The handler never answers; the caller gives up.
            let stuck =
                ServerLayer::new(known()).layer(tower::service_fn(|_: http::Request<Body>| {
                    std::future::pending::<Result<http::Response<Body>, Infallible>>()
                }));
            let gave_up = tokio::time::timeout(
                Duration::from_millis(20),
                stuck.oneshot(grpc_request(REFLECTION)),
            )
            .await;
            assert!(gave_up.is_err());
            // The same, past the caller's own deadline: what tonic answers it.
            let mut request = grpc_request("/grpc.health.v1.Health/Check");
            request
                .headers_mut()
                .insert("grpc-timeout", HeaderValue::from_static("5m"));
            let stuck =
                ServerLayer::new(known()).layer(tower::service_fn(|_: http::Request<Body>| {
                    std::future::pending::<Result<http::Response<Body>, Infallible>>()
                }));
            let gave_up =
                tokio::time::timeout(Duration::from_millis(30), stuck.oneshot(request)).await;
            assert!(gave_up.is_err());
            // A stream whose reader goes away after the first message.
            let mut response = server(ok_in_trailers)
                .oneshot(grpc_request("/grpc.health.v1.Health/Watch"))
                .await
                .unwrap();
            let first =
                std::future::poll_fn(|cx| Pin::new(response.body_mut()).poll_frame(cx)).await;
            assert!(first.is_some_and(|f| f.is_ok_and(|f| f.is_data())));
            drop(response);
        });
        for line in [
            r#"rpc_server_requests_total{service="grpc.reflection.v1.ServerReflection",method="ServerReflectionInfo",code="CANCELLED"} 1"#,
            r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Watch",code="CANCELLED"} 1"#,
            r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Check",code="DEADLINE_EXCEEDED"} 1"#,
        ] {
            assert!(
                recorded.metrics.contains(line),
                "{line} in {}",
                recorded.metrics
            );
        }
    }

    #[test]
    fn requests_that_are_not_grpc_pass_untouched() {
        let (response, recorded) = run(|| async {
            let request = http::Request::get("/metrics").body(Body::empty()).unwrap();
            server(ok_in_trailers).oneshot(request).await.unwrap()
        });
        assert!(response.headers().get(&TRACE_ID_HEADER).is_none());
        assert!(recorded.spans.is_empty(), "{:?}", recorded.spans);
        assert!(
            !recorded.metrics.contains("rpc_server"),
            "{}",
            recorded.metrics
        );
    }

    #[test]
    fn a_client_span_is_a_child_of_the_current_span_and_the_server_sees_it_as_parent() {
        let sent = Arc::new(Mutex::new(HeaderMap::new()));
        let ((caller, traceparent), recorded) = run(|| {
            let sent = sent.clone();
            async move {
                let seen = sent.clone();
                let channel = tower::service_fn(move |request: http::Request<Body>| {
                    *seen.lock().unwrap() = request.headers().clone();
                    std::future::ready(Ok::<_, tonic::Status>(ok_in_trailers()))
                });
                let caller = tracing::info_span!("caller");
                let response = Traced::new(channel)
                    .oneshot(grpc_request("/notes.v1.NotesService/GetNote"))
                    .instrument(caller.clone())
                    .await
                    .unwrap();
                drain(response).await;
                let caller_id = caller.context().span().span_context().span_id();
                let traceparent = sent.lock().unwrap().get("traceparent").cloned();
                (caller_id, traceparent)
            }
        });

        let span = recorded.span("notes.v1.NotesService/GetNote");
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(span.parent_span_id, caller);
        assert_eq!(
            attribute(span, "rpc.grpc.status_code"),
            Some(&Value::I64(0))
        );
        let expected = format!(
            "00-{}-{}-01",
            span.span_context.trace_id(),
            span.span_context.span_id()
        );
        assert_eq!(
            traceparent.as_ref().and_then(|v| v.to_str().ok()),
            Some(expected.as_str()),
            "the metadata names the client span as the server's parent"
        );
        assert!(
            recorded.metrics.contains(
                r#"rpc_client_requests_total{service="notes.v1.NotesService",method="GetNote",code="OK"} 1"#
            ),
            "{}",
            recorded.metrics
        );
    }

    #[test]
    fn a_failed_client_call_marks_its_span_as_an_error() {
        let ((), recorded) = run(|| async {
            let channel = tower::service_fn(|_: http::Request<Body>| {
                std::future::ready(Err::<http::Response<Body>, _>(tonic::Status::unavailable(
                    "connection refused",
                )))
            });
            let result = Traced::new(channel)
                .oneshot(grpc_request("/auth.v1.AuthService/Login"))
                .await;
            assert!(result.is_err());
            // NOT_FOUND is an error from where the client stands.
            let channel = tower::service_fn(|_: http::Request<Body>| {
                std::future::ready(Ok::<_, tonic::Status>(trailers_only(Code::NotFound)))
            });
            let response = Traced::new(channel)
                .oneshot(grpc_request("/profile.v1.ProfileService/GetProfile"))
                .await
                .unwrap();
            drain(response).await;
        });
        let login = recorded.span("auth.v1.AuthService/Login");
        assert_eq!(
            attribute(login, "rpc.grpc.status_code"),
            Some(&Value::I64(14))
        );
        assert!(matches!(login.status, Status::Error { .. }));
        let profile = recorded.span("profile.v1.ProfileService/GetProfile");
        assert!(matches!(profile.status, Status::Error { .. }));
        assert!(
            recorded.metrics.contains(
                r#"rpc_client_requests_total{service="auth.v1.AuthService",method="Login",code="UNAVAILABLE"} 1"#
            ),
            "{}",
            recorded.metrics
        );
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_spells_them() {
        let timeout = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_static(value));
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "5x", "-5m", "5 m"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }
}
