//! What a handler knows about the request it serves, beyond the request itself: its ids
//! ([`RequestContext`]) and its [`Deadline`], and how both travel on to a service
//! ([`RequestContext::grpc_request`]).

use std::{sync::Arc, time::Duration};

use axum::{extract::FromRequestParts, http::request::Parts};
use tokio::time::Instant;

use crate::{
    config::EdgeConfig,
    error::{ApiError, ErrorCode},
};

/// A caller whose access token the gateway verified (signature, expiry, revocation), before
/// any call to a service; routes that need a signed-in user take it. The token still travels
/// on to the service, which verifies it again itself.
#[derive(Debug, Clone)]
pub struct SignedIn(pub platform::identity::Caller);

impl FromRequestParts<crate::AppState> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        // Verified once per request by the rate limiter, when it ran.
        if let Some(crate::ratelimit::Verified(caller)) = parts.extensions.get() {
            return Ok(Self(caller.clone()));
        }
        let token = platform::access_token::bearer_header(&parts.headers).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "a bearer access token is required (`Authorization: Bearer <token>`)",
            )
        })?;
        match state.identity.verify(token).await {
            Ok(caller) => Ok(Self(caller)),
            Err(error) => Err(ApiError::from(error.into_status())),
        }
    }
}

/// A signed-in caller whose token carries the `admin` role (current: tokens issued before a
/// role change are refused); anyone else gets 403 without a call to a service. The service
/// checks again.
#[derive(Debug, Clone)]
pub struct Admin(pub platform::identity::Caller);

impl FromRequestParts<crate::AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        let SignedIn(caller) = SignedIn::from_request_parts(parts, state).await?;
        if caller.is_admin() {
            Ok(Self(caller))
        } else {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                "this route is for administrators",
            ))
        }
    }
}

/// The header a request id arrives and leaves in (and the gRPC metadata key it is passed on
/// under).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The ids of one request, set by the request middleware before any route runs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    request_id: Arc<str>,
    trace_id: Arc<str>,
}

impl RequestContext {
    pub(crate) fn new(request_id: Arc<str>, trace_id: Arc<str>) -> Self {
        Self {
            request_id,
            trace_id,
        }
    }

    /// The client's `X-Request-Id` when it was acceptable, else one the gateway generated;
    /// echoed on the response.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The W3C trace id (32 lowercase hex digits) of this request: the span's when a tracer
    /// is installed, else the caller's `traceparent`'s, else a random one.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// A request to a service carrying this request's id (`x-request-id` metadata) and its
    /// deadline (`grpc-timeout`); the channel adds the trace context. Fails with
    /// DEADLINE_EXCEEDED when no time is left, rather than making a call bound to fail.
    pub fn grpc_request<T>(
        &self,
        message: T,
        deadline: Deadline,
    ) -> Result<tonic::Request<T>, ApiError> {
        let mut request = tonic::Request::new(message);
        deadline.apply(&mut request)?;
        // The id was checked to be printable ASCII, so it is valid metadata.
        if let Ok(value) = self.request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_HEADER, value);
        }
        Ok(request)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a route runs outside the request middleware"))
    }
}

/// When the request must be answered by. API routes get one from the edge middleware
/// (`GATEWAY_REQUEST_TIMEOUT` after the request arrived); calls to services pass what is left
/// of it on as their gRPC deadline, so no service works on a request the client has stopped
/// waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    /// The time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Sets the gRPC deadline (`grpc-timeout`) of a call to the time left.
    pub fn apply<T>(self, request: &mut tonic::Request<T>) -> Result<(), ApiError> {
        let remaining = self.remaining();
        if remaining.is_zero() {
            return Err(ApiError::from_code(ErrorCode::DeadlineExceeded)
                .with_internal("deadline passed before the upstream call"));
        }
        request.set_timeout(remaining);
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Deadline {
    type Rejection = std::convert::Infallible;

    /// The request's deadline; a route outside the edge guard (none today) gets the default
    /// request timeout from now, so a call never goes out without a deadline.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Self>()
            .copied()
            .unwrap_or_else(|| Self::after(EdgeConfig::DEFAULT_REQUEST_TIMEOUT)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: fail loudly"
    )]

    use super::*;

    /// `grpc-timeout` is `<digits><unit>`; the unit tonic picks depends on the value.
    fn grpc_timeout(request: &tonic::Request<()>) -> Duration {
        let value = request
            .metadata()
            .get("grpc-timeout")
            .expect("grpc-timeout is set")
            .to_str()
            .unwrap();
        let (digits, unit) = value.split_at(value.len() - 1);
        let amount: u64 = digits.parse().unwrap();
        match unit {
            "H" => Duration::from_secs(amount * 3600),
            "M" => Duration::from_secs(amount * 60),
            "S" => Duration::from_secs(amount),
            "m" => Duration::from_millis(amount),
            "u" => Duration::from_micros(amount),
            "n" => Duration::from_nanos(amount),
            other => panic!("unit {other}"),
        }
    }

    #[tokio::test]
    async fn calls_carry_the_time_left_and_the_request_id() {
        let context = RequestContext::new("req-42".into(), "a".repeat(32).into());
        let request = context
            .grpc_request((), Deadline::after(Duration::from_secs(2)))
            .unwrap();
        let timeout = grpc_timeout(&request);
        assert!(
            timeout <= Duration::from_secs(2) && timeout > Duration::from_millis(1900),
            "{timeout:?}"
        );
        assert_eq!(request.metadata().get(REQUEST_ID_HEADER).unwrap(), "req-42");
    }

    #[tokio::test]
    async fn a_passed_deadline_fails_before_calling() {
        let context = RequestContext::new("req".into(), "a".repeat(32).into());
        let passed = Deadline(Instant::now() - Duration::from_millis(1));
        let error = context.grpc_request((), passed).unwrap_err();
        assert_eq!(error.code(), "DEADLINE_EXCEEDED");
        assert_eq!(error.status().as_u16(), 504);
    }
}

/// The client's address: the socket's peer, or — when the peer is a trusted proxy
/// (`GATEWAY_TRUSTED_PROXIES`) — the right-most untrusted `X-Forwarded-For` entry. A
/// client-sent `X-Forwarded-For` is never believed otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Set by the rate limiter, which honours `GATEWAY_TRUSTED_PROXIES`; else the socket's.
        if let Some(client) = parts.extensions.get::<Self>() {
            return Ok(*client);
        }
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}
