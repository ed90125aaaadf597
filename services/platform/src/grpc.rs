//! gRPC plumbing shared by servers and clients: one span per RPC joined to the caller's
//! trace, and lazily connected client channels that carry the trace context onward.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::trace_context;

/// The span of one incoming RPC, a child of the trace the caller sent (if any).
/// Passed to `Server::trace_fn`.
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let full_method = request.uri().path().trim_start_matches('/');
    let (service, method) = full_method.split_once('/').unwrap_or((full_method, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %full_method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    trace_context::set_parent_from(&span, request.headers());
    span
}

type Body = tonic::body::Body;

/// A channel that writes the current trace context into every request it sends.
pub type TracedChannel =
    tower::util::MapRequest<Channel, fn(http::Request<Body>) -> http::Request<Body>>;

fn inject_trace_context(mut request: http::Request<Body>) -> http::Request<Body> {
    trace_context::inject_current(request.headers_mut());
    request
}

/// Client-side timeouts for calls to another service.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Default deadline per call when the caller sets none.
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A channel to `url` that connects on first use, so start-up order does not matter.
pub fn lazy_channel(
    url: &str,
    config: ClientConfig,
) -> Result<TracedChannel, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(tower::ServiceExt::map_request(
        channel,
        inject_trace_context as fn(_) -> _,
    ))
}
