//! The gateway's routes, one module per concern, merged in [`router`].

mod admin;
mod auth;
mod jobs;
mod notes;
mod ops;
mod profile;

use std::net::IpAddr;

use axum::{
    Router,
    http::{HeaderMap, header},
};
use utoipa_axum::router::OpenApiRouter;

use crate::{
    AppState,
    context::{Deadline, RequestContext},
    error::{ApiError, ErrorCode},
    middleware::Edge,
};

/// The largest body limit a route sets for itself (above `GATEWAY_BODY_LIMIT`).
pub(crate) const LARGEST_ROUTE_BODY_LIMIT: usize = notes::BATCH_BODY_LIMIT;

/// Every route the gateway serves, before the middleware every route shares.
///
/// Operators' routes (`/health`, `/ready`, `/metrics`, `/openapi.json`, `/docs`) stay outside
/// the edge guard: they are never shed, so probes and scrapes still answer under overload,
/// and `/ready` bounds its own checks. API routes, one module per upstream service, go behind
/// it: each module's `router()` merged in [`api_routes`], a route class with its own timeout
/// guarded separately with `edge.guard(class_routes, its_timeout)`.
pub(crate) fn router(edge: &Edge, extra_api_routes: Router<AppState>) -> Router<AppState> {
    let api = Router::from(api_routes()).merge(extra_api_routes);
    let batches = Router::from(notes::batch_router());
    Router::from(ops::router())
        .merge(edge.guard(api, edge.config().request_timeout))
        .merge(edge.guard(batches, edge.config().batch_request_timeout))
}

/// Every route with its OpenAPI description: the router above and the document at
/// `/openapi.json` are both built from it, so they list the same routes.
///
/// A module registers a route once, from its handler: `#[utoipa::path(post, path = "/x",
/// ...)]` on the handler, and `.routes(routes!(handler))` in the module's `router()` (one
/// `routes!` per path, naming every method's handler; a layer for that path goes on it:
/// `routes!(a, b).layer(...)`).
pub(crate) fn documented() -> OpenApiRouter<AppState> {
    ops::router()
        .merge(api_routes())
        .merge(notes::batch_router())
}

fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(admin::router())
        .merge(auth::router())
        .merge(jobs::router())
        .merge(notes::router())
        .merge(profile::router())
}

/// A request to a service carrying the caller's bearer token, client address and user agent.
pub(crate) fn call<T>(
    context: &RequestContext,
    deadline: Deadline,
    headers: &HeaderMap,
    client: Option<IpAddr>,
    message: T,
) -> Result<tonic::Request<T>, ApiError> {
    let mut request = context.grpc_request(message, deadline)?;
    let metadata = request.metadata_mut();
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthenticated,
                    "the Authorization header is malformed",
                )
            })?;
        metadata.insert("authorization", value);
    }
    // The client address as the edge worked it out: a client-sent X-Forwarded-For is
    // believed only through trusted proxies.
    if let Some(value) = client.and_then(|ip| ip.to_string().parse().ok()) {
        metadata.insert("x-forwarded-for", value);
    }
    if let Some(value) = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        metadata.insert("user-agent", value);
    }
    Ok(request)
}

/// A request to profile or notes: the caller's bearer token, request id and deadline (the
/// client address and agent matter to auth only).
pub(crate) fn forward<T>(
    context: &RequestContext,
    deadline: Deadline,
    headers: &HeaderMap,
    message: T,
) -> Result<tonic::Request<T>, ApiError> {
    call(context, deadline, headers, None, message)
}

/// RFC 3339 in UTC, as every timestamp the gateway returns.
pub(crate) fn rfc3339(timestamp: Option<prost_types::Timestamp>) -> Option<String> {
    let t = timestamp?;
    let nanos = u32::try_from(t.nanos).ok()?;
    chrono::DateTime::from_timestamp(t.seconds, nanos)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}
