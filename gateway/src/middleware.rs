//! What wraps every request, outermost first:
//!
//! 1. compression of responses of at least `GATEWAY_COMPRESSION_MIN_BYTES` (gzip or brotli,
//!    as `Accept-Encoding` allows);
//! 2. [`observe`]: the request id, the span joined to the caller's trace and the trace id,
//!    problem bodies and error logs, `X-Process-Time`, metrics and the slow-request log line;
//! 3. CORS, when `GATEWAY_CORS_ALLOWED_ORIGINS` is set;
//! 4. for API routes only ([`Edge::guard`]): load shedding past
//!    `GATEWAY_MAX_CONCURRENT_REQUESTS`, the request deadline, the body limit.
//!
//! Unknown paths and methods answer 404/405 problems from the fallbacks set here.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header},
    middleware::{Next, from_fn_with_state},
    response::{IntoResponse as _, Response},
};
use tokio::{sync::Semaphore, time::Instant};
use tower_http::{
    compression::{
        CompressionLayer, Predicate as _,
        predicate::{NotForContentType, SizeAbove},
    },
    cors::{AllowOrigin, CorsLayer},
};
use tracing::Instrument as _;

use crate::{
    AppState,
    config::{CorsOrigins, EdgeConfig},
    context::{Deadline, REQUEST_ID_HEADER, RequestContext},
    error::{self, ApiError, ErrorCode},
    idempotency::IdempotencyStore,
    ratelimit::RateLimiter,
};

const X_REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const X_PROCESS_TIME: HeaderName = HeaderName::from_static("x-process-time");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The longest client request id kept; longer ones are replaced.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 128;

/// The edge settings and the one concurrency budget every API route shares.
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    config: EdgeConfig,
    in_flight: Arc<Semaphore>,
    rate_limiter: RateLimiter,
    idempotency: IdempotencyStore,
}

impl Edge {
    pub(crate) fn new(
        config: &EdgeConfig,
        rate_limiter: RateLimiter,
        idempotency: IdempotencyStore,
    ) -> Self {
        Self {
            config: config.clone(),
            in_flight: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            rate_limiter,
            idempotency,
        }
    }

    pub(crate) fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// `routes` behind the edge guard: shed at once while the concurrency budget is spent,
    /// rate-limited (429 past a tier's limit), retries with an `Idempotency-Key` answered
    /// from the first response, answered 504 past `timeout` (whose deadline
    /// handlers pass on to services), bodies
    /// limited to `GATEWAY_BODY_LIMIT` unless a route sets its own
    /// `DefaultBodyLimit`. A route class with its own timeout is guarded with it.
    pub(crate) fn guard(&self, routes: Router<AppState>, timeout: Duration) -> Router<AppState> {
        routes
            .layer(DefaultBodyLimit::max(self.config.body_limit))
            .layer(from_fn_with_state(timeout, enforce_deadline))
            .layer(from_fn_with_state(
                self.idempotency.clone(),
                crate::idempotency::idempotency,
            ))
            .layer(from_fn_with_state(
                self.rate_limiter.clone(),
                crate::ratelimit::rate_limit,
            ))
            .layer(from_fn_with_state(self.in_flight.clone(), shed_load))
    }
}

/// The fallbacks and the layers every route gets, API and operations alike. Call once every
/// route is in `router`: the 405 fallback reaches only the routes present.
pub(crate) fn apply(router: Router<AppState>, edge: &Edge) -> Router<AppState> {
    let router = router
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let router = match cors_layer(&edge.config.cors_allowed_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(from_fn_with_state(
            edge.config.slow_request_threshold,
            observe,
        ))
        .layer(compression_layer(edge.config.compression_min_bytes))
}

/// gzip or brotli (quality 4 for brotli, as nginx does on the fly) for bodies of at least
/// `min_bytes`, or of unknown size; never for gRPC, images or event streams, which would
/// gain nothing or be delayed.
fn compression_layer(min_bytes: u64) -> CompressionLayer<impl tower_http::compression::Predicate> {
    CompressionLayer::new().compress_when(
        SizeAbove::new(min_bytes)
            .and(NotForContentType::GRPC)
            .and(NotForContentType::IMAGES)
            .and(NotForContentType::SSE),
    )
}

fn cors_layer(origins: &CorsOrigins) -> Option<CorsLayer> {
    let allow_origin = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                X_REQUEST_ID,
                HeaderName::from_static("idempotency-key"),
                TRACEPARENT,
                HeaderName::from_static("tracestate"),
            ])
            .expose_headers([
                X_REQUEST_ID,
                X_PROCESS_TIME,
                header::RETRY_AFTER,
                header::ETAG,
                header::LOCATION,
                HeaderName::from_static("ratelimit"),
                HeaderName::from_static("ratelimit-policy"),
            ])
            // Browsers cap this anyway (Chromium at 2 h); 10 min keeps preflights rare.
            .max_age(Duration::from_secs(600)),
    )
}

/// One span, one set of metrics and one request id per request; problem bodies written and
/// errors logged on the way out. Metrics are labelled by route template, not raw path, so
/// ids in paths do not explode the label set.
async fn observe(
    State(slow_request_threshold): State<Duration>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|value| is_acceptable_request_id(value))
        .cloned()
        .unwrap_or_else(generated_request_id);
    // Routes and services see the id the client is answered with, never a rejected one.
    request
        .headers_mut()
        .insert(X_REQUEST_ID, request_id.clone());
    let request_id_text: Arc<str> = request_id.to_str().unwrap_or_default().into();

    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id_text,
        trace_id = tracing::field::Empty,
    );
    // The parent first: reading the span's trace id below fixes it.
    platform::trace_context::set_parent_from(&span, request.headers());
    let trace_id: Arc<str> = trace_id_for(&span, request.headers()).into();
    span.record("trace_id", &*trace_id);
    let context = RequestContext::new(request_id_text, trace_id);
    request.extensions_mut().insert(context.clone());

    let response = next.run(request).instrument(span.clone()).await;

    let mut response = span.in_scope(|| error::finish(response, &context));
    let elapsed = started.elapsed();
    let status = response.status();
    let headers = response.headers_mut();
    headers.insert(X_REQUEST_ID, request_id);
    if let Ok(value) = HeaderValue::from_str(&format!("{:.6}", elapsed.as_secs_f64())) {
        headers.insert(X_PROCESS_TIME, value);
    }

    span.record("http.response.status_code", status.as_u16());
    if !slow_request_threshold.is_zero() && elapsed >= slow_request_threshold {
        tracing::warn!(
            parent: &span,
            trace_id = context.trace_id(),
            request_id = context.request_id(),
            method = %method,
            route = %route,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            threshold_ms = slow_request_threshold.as_secs_f64() * 1000.0,
            "slow request"
        );
    }
    let labels = [
        ("method", method.to_string()),
        ("route", route),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    response
}

/// A client's request id is kept when it is 1 to 128 printable ASCII characters (space to
/// `~`): anything else could break log lines or headers downstream.
pub(crate) fn is_acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(|b| (b' '..=b'~').contains(b))
}

fn generated_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The trace id of this request, the same one everywhere it shows (problem bodies, logs,
/// exported spans): the span's own when a tracer is installed (a child of the caller's
/// `traceparent`, or a new trace); without one, the caller's `traceparent`'s; else a random
/// W3C trace id, made once here and used for the whole request.
pub(crate) fn trace_id_for(span: &tracing::Span, headers: &HeaderMap) -> String {
    span.in_scope(platform::telemetry::current_trace_id)
        .or_else(|| traceparent_trace_id(headers))
        .unwrap_or_else(random_trace_id)
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later versions
/// may append fields), lowercase and not all zeros.
fn traceparent_trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(&TRACEPARENT)?.to_str().ok()?.trim();
    let mut fields = value.split('-');
    let (version, trace_id, parent_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let is_zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = is_hex(version, 2)
        && version != "ff"
        && (version != "00" || fields.next().is_none())
        && is_hex(trace_id, 32)
        && !is_zero(trace_id)
        && is_hex(parent_id, 16)
        && !is_zero(parent_id)
        && is_hex(flags, 2);
    valid.then(|| trace_id.to_owned())
}

/// 32 lowercase hex digits, never all zeros: the random bits of a v4 UUID (its last 7 bytes
/// are random, as W3C Trace Context level 2 asks of the right-most part).
fn random_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Sheds the request at once when the concurrency budget is spent: a quick 503 the client
/// can retry beats a queue that grows until every request times out.
async fn shed_load(
    State(in_flight): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = in_flight.try_acquire() else {
        metrics::counter!("http_requests_shed_total").increment(1);
        return ApiError::from_code(ErrorCode::Overloaded)
            .with_retry_after(Duration::from_secs(1))
            .into_response();
    };
    // The permit is held until the response head is ready; a streamed body does not hold it.
    next.run(request).await
}

/// Sets the request's [`Deadline`] (the earlier of `timeout` from now and any deadline set
/// further out) and answers 504 when it passes; dropping the route's future cancels its
/// calls to services.
async fn enforce_deadline(
    State(timeout): State<Duration>,
    mut request: Request,
    next: Next,
) -> Response {
    let own = Deadline::after(timeout);
    let deadline = request
        .extensions()
        .get::<Deadline>()
        .map_or(own, |outer| own.min(*outer));
    request.extensions_mut().insert(deadline);
    match tokio::time::timeout_at(deadline.instant(), next.run(request)).await {
        // A call cut by its own deadline comes back from tonic as CANCELLED ("Timeout
        // expired"); past the deadline that is the request running out of time: 504.
        Ok(response)
            if response.status() == error::client_closed_request()
                && tokio::time::Instant::now() >= deadline.instant() =>
        {
            ApiError::from_code(ErrorCode::DeadlineExceeded)
                .with_internal(format_args!("a call ran past the {timeout:?} deadline"))
                .into_response()
        }
        Ok(response) => response,
        Err(_) => ApiError::from_code(ErrorCode::DeadlineExceeded)
            .with_internal(format_args!("no response within {timeout:?}"))
            .into_response(),
    }
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::RouteNotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

/// axum adds the `Allow` header listing the methods the path has.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} does not accept {method}; the Allow header lists what it does",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: fail loudly"
    )]

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_printable() {
        let ok = |s: &[u8]| is_acceptable_request_id(&HeaderValue::from_bytes(s).unwrap());
        assert!(ok(b"abc-123"));
        assert!(ok(b"with spaces and ~!@#"));
        assert!(ok("x".repeat(128).as_bytes()));
        assert!(!ok("x".repeat(129).as_bytes()));
        assert!(!ok(b""));
        assert!(!ok(b"tab\there"));
        assert!(!ok("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn traceparents() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(TRACEPARENT, value.parse().unwrap());
            traceparent_trace_id(&headers)
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            with(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            with(&format!("01-{id}-00f067aa0ba902b7-01-future")).as_deref(),
            Some(id)
        );
        assert_eq!(with(&format!("00-{id}-00f067aa0ba902b7-01-x")), None);
        assert_eq!(
            with("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            with(&format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase())),
            None
        );
        assert_eq!(with("garbage"), None);
    }

    #[test]
    fn without_a_tracer_the_trace_id_is_random_and_w3c_valid() {
        let span = tracing::info_span!("http");
        let first = trace_id_for(&span, &HeaderMap::new());
        let second = trace_id_for(&span, &HeaderMap::new());
        for id in [&first, &second] {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
        assert_ne!(first, second);
    }

    /// With a tracer installed the id in problem bodies is the exported span's, and a
    /// caller's `traceparent` is joined.
    #[test]
    fn with_a_tracer_the_trace_id_is_the_span_s() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("http");
            let headers = HeaderMap::new();
            platform::trace_context::set_parent_from(&span, &headers);
            let trace_id = trace_id_for(&span, &headers);
            assert_eq!(
                Some(&trace_id),
                span.in_scope(platform::telemetry::current_trace_id)
                    .as_ref()
            );

            let mut headers = HeaderMap::new();
            headers.insert(
                TRACEPARENT,
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            let span = tracing::info_span!("http");
            platform::trace_context::set_parent_from(&span, &headers);
            assert_eq!(
                trace_id_for(&span, &headers),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
        });
    }
}
