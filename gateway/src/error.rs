//! One error type for every failure the gateway answers: [`ApiError`], rendered as RFC 9457
//! problem details (`application/problem+json`).
//!
//! The shape (every field always present except `errors`):
//!
//! ```json
//! { "type": "https://errors.svcset.dev/VALIDATION_FAILED", "title": "Validation failed",
//!   "status": 400, "detail": "…", "code": "VALIDATION_FAILED",
//!   "request_id": "…", "trace_id": "<32 hex>",
//!   "errors": [{ "field": "note.title", "code": "INVALID_TYPE", "message": "…" }] }
//! ```
//!
//! `code` is the stable machine code (`docs/errors.md` lists every one); `type` is
//! [`TYPE_BASE`] followed by that code. A handler returns an `ApiError`; its `IntoResponse`
//! sets the status and headers and leaves the body to the request middleware, which knows
//! the request id and trace id, writes the body and logs the error (never `IntoResponse`
//! itself, so one failure is one log line, on the request's span).

use std::{borrow::Cow, fmt, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::context::RequestContext;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every problem `type` is this followed by the machine code, e.g.
/// `https://errors.svcset.dev/ROUTE_NOT_FOUND`.
pub const TYPE_BASE: &str = "https://errors.svcset.dev/";

/// The machine codes the gateway itself answers with. A service may send a more specific one
/// (its `google.rpc.ErrorInfo.reason`, e.g. `ETAG_MISMATCH`), which then replaces the
/// gateway's code for that gRPC status. `docs/errors.md` documents them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: a request the gateway cannot read (and any 4xx without a code of its own).
    BadRequest,
    /// 400: a service rejected an argument without naming a field (INVALID_ARGUMENT).
    InvalidArgument,
    /// 400: one or more fields are invalid; `errors` names each.
    ValidationFailed,
    /// 400: the body is not JSON; `detail` and `errors` give the line, column and path.
    MalformedJson,
    /// 400: a value is outside the range the operation accepts (OUT_OF_RANGE).
    OutOfRange,
    /// 401: no valid credentials (UNAUTHENTICATED).
    Unauthenticated,
    /// 403: the caller may not do this (PERMISSION_DENIED).
    PermissionDenied,
    /// 404: the resource does not exist or is not the caller's (NOT_FOUND).
    NotFound,
    /// 404: no route has this path.
    RouteNotFound,
    /// 405: the path exists but not with this method; `Allow` lists the methods it has.
    MethodNotAllowed,
    /// 409: the resource already exists (ALREADY_EXISTS).
    AlreadyExists,
    /// 409: the resource's current state forbids the operation (ABORTED).
    Conflict,
    /// 412: a precondition such as an expected ETag does not hold (FAILED_PRECONDITION).
    PreconditionFailed,
    /// 422: an `Idempotency-Key` already used for a different request (method, path or body).
    IdempotencyKeyReused,
    /// 413: the body is larger than the route accepts.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 429: a quota or throttle ran out (RESOURCE_EXHAUSTED); `Retry-After` says when to retry.
    ResourceExhausted,
    /// 429: the gateway's rate limit for this caller and route class is spent; `Retry-After`,
    /// `RateLimit` and `RateLimit-Policy` say which and until when.
    RateLimited,
    /// 499: the call was cancelled before it finished (CANCELLED).
    RequestCancelled,
    /// 500: a failure on our side (INTERNAL, UNKNOWN, DATA_LOSS); details are only logged.
    Internal,
    /// 501: the operation is not implemented (UNIMPLEMENTED).
    NotImplemented,
    /// 503: a service is unavailable (UNAVAILABLE); retry with backoff.
    Unavailable,
    /// 503: the gateway is at its concurrency limit and shed the request; `Retry-After: 1`.
    Overloaded,
    /// 504: the request ran out of time, at the gateway or in a service (DEADLINE_EXCEEDED).
    DeadlineExceeded,
}

impl ErrorCode {
    /// Every code, for the documentation test.
    pub const ALL: [Self; 24] = [
        Self::BadRequest,
        Self::InvalidArgument,
        Self::ValidationFailed,
        Self::MalformedJson,
        Self::OutOfRange,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::NotFound,
        Self::RouteNotFound,
        Self::MethodNotAllowed,
        Self::AlreadyExists,
        Self::Conflict,
        Self::PreconditionFailed,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::IdempotencyKeyReused,
        Self::ResourceExhausted,
        Self::RateLimited,
        Self::RequestCancelled,
        Self::Internal,
        Self::NotImplemented,
        Self::Unavailable,
        Self::Overloaded,
        Self::DeadlineExceeded,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BAD_REQUEST",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::ValidationFailed => "VALIDATION_FAILED",
            Self::MalformedJson => "MALFORMED_JSON",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::NotFound => "NOT_FOUND",
            Self::RouteNotFound => "ROUTE_NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::Conflict => "CONFLICT",
            Self::PreconditionFailed => "PRECONDITION_FAILED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::RateLimited => "RATE_LIMITED",
            Self::RequestCancelled => "REQUEST_CANCELLED",
            Self::Internal => "INTERNAL",
            Self::NotImplemented => "NOT_IMPLEMENTED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Overloaded => "OVERLOADED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest
            | Self::InvalidArgument
            | Self::ValidationFailed
            | Self::MalformedJson
            | Self::OutOfRange => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::NotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::AlreadyExists | Self::Conflict => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ResourceExhausted | Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestCancelled => client_closed_request(),
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short summary that is the same for every occurrence of the code.
    pub const fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad request",
            Self::InvalidArgument => "Invalid argument",
            Self::ValidationFailed => "Validation failed",
            Self::MalformedJson => "Malformed JSON",
            Self::OutOfRange => "Out of range",
            Self::Unauthenticated => "Unauthenticated",
            Self::PermissionDenied => "Permission denied",
            Self::NotFound => "Not found",
            Self::RouteNotFound => "Route not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::AlreadyExists => "Already exists",
            Self::Conflict => "Conflict",
            Self::PreconditionFailed => "Precondition failed",
            Self::PayloadTooLarge => "Payload too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::IdempotencyKeyReused => "Idempotency key reused",
            Self::ResourceExhausted => "Too many requests",
            Self::RateLimited => "Rate limit exceeded",
            Self::RequestCancelled => "Request cancelled",
            Self::Internal => "Internal error",
            Self::NotImplemented => "Not implemented",
            Self::Unavailable => "Service unavailable",
            Self::Overloaded => "Overloaded",
            Self::DeadlineExceeded => "Deadline exceeded",
        }
    }

    /// The detail sent when there is nothing more specific to say, or when the specifics
    /// must stay inside (a service's INTERNAL message, a transport error).
    pub const fn default_detail(self) -> &'static str {
        match self {
            Self::BadRequest => "the request cannot be read",
            Self::InvalidArgument => "an argument is invalid",
            Self::ValidationFailed => "one or more fields are invalid",
            Self::MalformedJson => "the body is not valid JSON",
            Self::OutOfRange => "a value is out of range",
            Self::Unauthenticated => "valid credentials are required",
            Self::PermissionDenied => "the caller may not do this",
            Self::NotFound => "the resource does not exist",
            Self::RouteNotFound => "no route has this path",
            Self::MethodNotAllowed => "this path does not accept this method",
            Self::AlreadyExists => "the resource already exists",
            Self::Conflict => "the resource's current state forbids this operation",
            Self::PreconditionFailed => "a precondition of the request does not hold",
            Self::PayloadTooLarge => "the request body is larger than this route accepts",
            Self::UnsupportedMediaType => "the body must be JSON (Content-Type: application/json)",
            Self::IdempotencyKeyReused => "this Idempotency-Key was used for a different request",
            Self::ResourceExhausted => "too many requests; retry later",
            Self::RateLimited => "the rate limit for this kind of request is spent; retry later",
            Self::RequestCancelled => "the request was cancelled",
            Self::Internal => "internal error",
            Self::NotImplemented => "this operation is not implemented",
            Self::Unavailable => "a service is unavailable; retry later",
            Self::Overloaded => "the gateway is overloaded; retry later",
            Self::DeadlineExceeded => "the request took too long",
        }
    }

    /// The gateway's code for a gRPC status code that carries no reason of its own.
    pub fn for_grpc(code: Code) -> Self {
        match code {
            Code::Cancelled => Self::RequestCancelled,
            Code::InvalidArgument => Self::InvalidArgument,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::FailedPrecondition => Self::PreconditionFailed,
            Code::Aborted => Self::Conflict,
            Code::OutOfRange => Self::OutOfRange,
            Code::Unimplemented => Self::NotImplemented,
            Code::Unavailable => Self::Unavailable,
            Code::Unauthenticated => Self::Unauthenticated,
            // OK is not an error: converting it into one is a bug, reported as one.
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }

    /// The code for an error response that arrived without a problem body (a rejection
    /// of an axum extractor, a layer's own answer): by its status.
    pub fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            412 => Self::PreconditionFailed,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            422 => Self::ValidationFailed,
            429 => Self::ResourceExhausted,
            499 => Self::RequestCancelled,
            501 => Self::NotImplemented,
            503 => Self::Unavailable,
            504 => Self::DeadlineExceeded,
            400..=499 => Self::BadRequest,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// 499, nginx's "client closed request": what CANCELLED means seen from HTTP.
pub(crate) fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// The one table from gRPC status code to HTTP status. Every code is covered; OK maps to 200
/// because it is not an error (an OK status turned into an [`ApiError`] is answered as 500).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => client_closed_request(),
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // The contract reserves FAILED_PRECONDITION for an expected ETag that does not match.
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// Whether a service's status message may reach the client. Messages of codes that describe
/// the caller's request are written for callers (the contract says so); the others may carry
/// internals (a bug, a connection error naming an address) and are only logged.
fn message_is_for_clients(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unauthenticated
    )
}

/// One invalid field of a validation error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's path in the request, e.g. `items[2].title`; empty for the whole body.
    pub field: String,
    /// A machine code for what is wrong with it, e.g. `INVALID_TYPE` (see `docs/errors.md`).
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Every failure the gateway answers: a status, a machine code, a detail safe for clients,
/// and what only the logs may see. Boxed, so `Result<T, ApiError>` stays one word wide on the
/// success path.
#[derive(Debug, Clone)]
pub struct ApiError(Box<ErrorParts>);

#[derive(Debug, Clone)]
struct ErrorParts {
    status: StatusCode,
    code: Cow<'static, str>,
    title: &'static str,
    detail: Cow<'static, str>,
    errors: Vec<FieldError>,
    retry_after: Option<Duration>,
    /// What went wrong inside: logged by the middleware, never sent.
    internal: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<Cow<'static, str>>) -> Self {
        Self(Box::new(ErrorParts {
            status: code.status(),
            code: Cow::Borrowed(code.as_str()),
            title: code.title(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            internal: None,
        }))
    }

    /// An error with the code's standard detail.
    pub fn from_code(code: ErrorCode) -> Self {
        Self::new(code, code.default_detail())
    }

    /// A failure the client cannot act on: 500 with a fixed detail; `error` goes to the log.
    pub fn internal(error: impl fmt::Display) -> Self {
        Self::from_code(ErrorCode::Internal).with_internal(error)
    }

    /// The fields that are invalid (validation errors).
    #[must_use]
    pub fn with_field_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.0.errors = errors;
        self
    }

    /// Answers with `Retry-After` (whole seconds, rounded up).
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.0.retry_after = Some(delay);
        self
    }

    /// Adds what the logs should say about the failure; never sent to the client.
    #[must_use]
    pub fn with_internal(mut self, internal: impl fmt::Display) -> Self {
        self.0.internal = Some(internal.to_string());
        self
    }

    /// Replaces the machine code with a more specific one (a service's reason), keeping the
    /// status and title. Ignored unless it is SCREAMING_SNAKE, as `google.rpc.ErrorInfo`
    /// requires: a code clients switch on must never be free text.
    #[must_use]
    pub fn with_reason(mut self, reason: &str) -> Self {
        if is_machine_code(reason) {
            self.0.code = Cow::Owned(reason.to_owned());
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    pub fn code(&self) -> &str {
        &self.0.code
    }

    pub fn detail(&self) -> &str {
        &self.0.detail
    }

    pub fn field_errors(&self) -> &[FieldError] {
        &self.0.errors
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// The body of this error for one request.
    pub(crate) fn problem<'a>(&'a self, context: &'a RequestContext) -> Problem<'a> {
        Problem {
            type_uri: format!("{TYPE_BASE}{}", self.0.code),
            title: self.0.title,
            status: self.0.status.as_u16(),
            detail: &self.0.detail,
            code: &self.0.code,
            request_id: context.request_id(),
            trace_id: context.trace_id(),
            errors: &self.0.errors,
        }
    }

    /// One log line for this error, on the current (request) span: server failures with
    /// their internal details at `error`/`warn`, the caller's mistakes at `debug`.
    pub(crate) fn log(&self) {
        let code = self.0.code.as_ref();
        let status = self.0.status.as_u16();
        let internal = self.0.internal.as_deref().unwrap_or_default();
        match status {
            500 => tracing::error!(code, status, internal, "request failed"),
            // Shedding happens under load: a line per shed request would add to it.
            503 if code == ErrorCode::Overloaded.as_str() => {
                tracing::debug!(code, status, "request shed");
            }
            501..=599 => tracing::warn!(code, status, internal, "request failed"),
            _ => tracing::debug!(code, status, internal, "request rejected"),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.0.code, self.0.status, self.0.detail)
    }
}

impl std::error::Error for ApiError {}

/// `[A-Z][A-Z0-9_]*[A-Z0-9]`, at most 63 characters: the form `google.rpc.ErrorInfo.reason`
/// takes.
fn is_machine_code(s: &str) -> bool {
    let bytes = s.as_bytes();
    (2..=63).contains(&bytes.len())
        && bytes[0].is_ascii_uppercase()
        && bytes[bytes.len() - 1] != b'_'
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
}

impl From<tonic::Status> for ApiError {
    /// Maps a service's status through [`http_status`], reading its rich details:
    /// `ErrorInfo.reason` becomes the machine code, `BadRequest` field violations become
    /// `errors`, `RetryInfo` becomes `Retry-After`. Messages of server-side codes are logged,
    /// never returned.
    fn from(status: tonic::Status) -> Self {
        let grpc_code = status.code();
        let code = ErrorCode::for_grpc(grpc_code);
        let details = status.get_error_details();
        let field_errors: Vec<FieldError> = details
            .bad_request()
            .map(|bad_request| {
                bad_request
                    .field_violations
                    .iter()
                    .map(|violation| {
                        let code = if is_machine_code(&violation.reason) {
                            violation.reason.clone()
                        } else {
                            "INVALID".to_owned()
                        };
                        FieldError::new(&violation.field, code, &violation.description)
                    })
                    .collect()
            })
            .unwrap_or_default();

        let code = if grpc_code == Code::InvalidArgument && !field_errors.is_empty() {
            ErrorCode::ValidationFailed
        } else {
            code
        };
        let mut error = if message_is_for_clients(grpc_code) && !status.message().is_empty() {
            Self::new(code, status.message().to_owned())
        } else {
            Self::from_code(code)
        };
        // The table decides the status, whatever code a reason or violations chose.
        error.0.status = http_status(grpc_code);
        if grpc_code == Code::Ok {
            error.0.status = StatusCode::INTERNAL_SERVER_ERROR;
        }
        if !message_is_for_clients(grpc_code) {
            error.0.internal = Some(format!(
                "upstream {grpc_code:?}: {}",
                status.message().escape_debug()
            ));
        }
        if let Some(info) = details.error_info() {
            error = error.with_reason(&info.reason);
        }
        if let Some(delay) = details.retry_info().and_then(|info| info.retry_delay) {
            error = error.with_retry_after(delay);
        }
        error.with_field_errors(field_errors)
    }
}

/// What the middleware finds on a response built from an [`ApiError`]: the error itself,
/// for the body (which needs the request's ids) and the log line.
#[derive(Debug, Clone)]
pub(crate) struct PendingProblem(pub(crate) ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = self.0.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(delay) = self.0.retry_after {
            headers.insert(header::RETRY_AFTER, retry_after_seconds(delay));
        }
        response.extensions_mut().insert(PendingProblem(self));
        response
    }
}

/// `Retry-After` in whole seconds, rounded up so a client never retries too early.
fn retry_after_seconds(delay: Duration) -> HeaderValue {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    HeaderValue::from(seconds)
}

/// The problem details body (RFC 9457) with the gateway's extension members.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Problem<'a> {
    /// `https://errors.svcset.dev/` followed by `code`.
    #[serde(rename = "type")]
    type_uri: String,
    /// A short summary, the same for every occurrence of the code.
    title: &'a str,
    /// The HTTP status, repeated.
    status: u16,
    /// What went wrong with this request, for people.
    detail: &'a str,
    /// The stable machine code (docs/errors.md); clients switch on it.
    code: &'a str,
    /// The response's `X-Request-Id`.
    request_id: &'a str,
    /// The W3C trace id of the request (32 lowercase hex digits).
    trace_id: &'a str,
    /// For validation errors: one entry per invalid field.
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    #[schema(required = false)]
    errors: &'a [FieldError],
}

/// Finishes an error response on its way out of the request middleware: writes the problem
/// body of an [`ApiError`] and logs it; turns an error response that has no body of ours
/// (an axum rejection in plain text, a layer's bare status) into a problem too, so clients
/// meet one error shape. Everything else passes untouched.
pub(crate) fn finish(mut response: Response, context: &RequestContext) -> Response {
    let error = match response.extensions_mut().remove::<PendingProblem>() {
        Some(PendingProblem(error)) => error,
        None if is_foreign_error(&response) => {
            let status = response.status();
            let mut error = ApiError::from_code(ErrorCode::for_status(status))
                .with_internal(format!("{status} answered without a problem body"));
            // Keep the status that was answered (a 4xx without a code of its own stays what
            // it was); the code tells what class of failure it is.
            error.0.status = status;
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
            headers.remove(header::CONTENT_LENGTH);
            error
        }
        None => return response,
    };
    error.log();
    let body = serde_json::to_vec(&error.problem(context)).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialize a problem");
        br#"{"type":"about:blank","title":"Internal error","status":500}"#.to_vec()
    });
    *response.body_mut() = Body::from(body);
    response
}

/// An error status whose body is not a JSON document of some route's own (such as the
/// readiness report): no content type, or plain text.
fn is_foreign_error(response: &Response) -> bool {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return false;
    }
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|value| value.as_bytes().starts_with(b"text/plain"))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: fail loudly"
    )]

    use tonic_types::{ErrorDetails, FieldViolation};

    use super::*;

    /// The whole table, pinned: changing a row is a contract change for every client.
    #[test]
    fn every_grpc_code_maps_to_its_http_status() {
        let table = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 412),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        assert_eq!(table.len(), 17, "every gRPC code");
        for (code, status) in table {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
            // The code the gateway answers with, absent a reason, agrees with the table.
            if code != Code::Ok {
                assert_eq!(
                    ErrorCode::for_grpc(code).status().as_u16(),
                    status,
                    "{code:?}"
                );
                let error = ApiError::from(tonic::Status::new(code, "m"));
                assert_eq!(error.status().as_u16(), status, "{code:?}");
            }
        }
    }

    #[test]
    fn an_ok_status_turned_into_an_error_is_a_500() {
        let error = ApiError::from(tonic::Status::new(Code::Ok, ""));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code(), "INTERNAL");
    }

    #[test]
    fn internal_messages_are_logged_never_returned() {
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
            Code::Unavailable,
        ] {
            let error = ApiError::from(tonic::Status::new(
                code,
                "connection to 10.0.0.7:5432 refused: password authentication failed",
            ));
            assert!(!error.detail().contains("10.0.0.7"), "{code:?}");
            assert!(
                error
                    .0
                    .internal
                    .as_deref()
                    .is_some_and(|i| i.contains("10.0.0.7")),
                "{code:?}: the log still has it"
            );
        }
        let error = ApiError::from(tonic::Status::not_found("no such note"));
        assert_eq!(error.detail(), "no such note");
        assert_eq!(error.code(), "NOT_FOUND");
    }

    #[test]
    fn rich_details_fill_code_field_errors_and_retry_after() {
        let mut details = ErrorDetails::with_bad_request(vec![
            FieldViolation::new("items[2].title", "must not be empty"),
            FieldViolation {
                reason: "TOO_LONG".to_owned(),
                ..FieldViolation::new("items[3].tags[0]", "at most 40 characters")
            },
        ]);
        details.set_error_info("NOTE_LIMITS", "notes.svcset.dev", []);
        let status =
            tonic::Status::with_error_details(Code::InvalidArgument, "invalid batch", details);
        let error = ApiError::from(status);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.code(), "NOTE_LIMITS", "the service's reason wins");
        assert_eq!(
            error.field_errors(),
            [
                FieldError::new("items[2].title", "INVALID", "must not be empty"),
                FieldError::new("items[3].tags[0]", "TOO_LONG", "at most 40 characters"),
            ]
        );

        let status = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "invalid",
            ErrorDetails::with_bad_request_violation("note.title", "required"),
        );
        assert_eq!(ApiError::from(status).code(), "VALIDATION_FAILED");

        let status = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(2500))),
        );
        let response = ApiError::from(status).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn a_reason_that_is_not_a_machine_code_is_ignored() {
        let status = tonic::Status::with_error_details(
            Code::FailedPrecondition,
            "etag does not match",
            ErrorDetails::with_error_info("etag mismatch!", "notes", []),
        );
        let error = ApiError::from(status);
        assert_eq!(error.code(), "PRECONDITION_FAILED");
        assert!(is_machine_code("ETAG_MISMATCH"));
        assert!(!is_machine_code("_X"));
        assert!(!is_machine_code("X_"));
        assert!(!is_machine_code("Etag"));
    }

    #[tokio::test]
    async fn the_middleware_writes_the_body_with_the_request_s_ids() {
        let context =
            RequestContext::new("req-1".into(), "0af7651916cd43dd8448eb211c80319c".into());
        let response = ApiError::from_code(ErrorCode::RouteNotFound).into_response();
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let response = finish(response, &context);
        assert!(response.extensions().get::<PendingProblem>().is_none());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "https://errors.svcset.dev/ROUTE_NOT_FOUND",
                "title": "Route not found",
                "status": 404,
                "detail": "no route has this path",
                "code": "ROUTE_NOT_FOUND",
                "request_id": "req-1",
                "trace_id": "0af7651916cd43dd8448eb211c80319c",
            })
        );
    }

    #[tokio::test]
    async fn plain_text_error_responses_become_problems() {
        let context = RequestContext::new("req-2".into(), "1".repeat(32).into());
        let rejection = (StatusCode::UNPROCESSABLE_ENTITY, "Failed to parse").into_response();
        let response = finish(rejection, &context);
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "VALIDATION_FAILED");
        assert_eq!(body["request_id"], "req-2");

        let readiness = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "not_ready" })),
        )
            .into_response();
        let response = finish(readiness, &context);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn every_code_is_documented() {
        let docs = include_str!("../../docs/errors.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{code}` | {} |", code.status().as_u16());
            assert!(docs.contains(&row), "docs/errors.md lacks the row {row}");
        }
    }
}
