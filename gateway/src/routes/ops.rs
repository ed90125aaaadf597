//! Routes for operators and orchestrators: liveness, readiness, metrics, and the API's own
//! description.

use std::sync::atomic::Ordering;

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{AppState, openapi, upstream::DependencyState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs_page))
}

#[derive(Debug, Serialize, ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Liveness: the process answers. No I/O, so a slow dependency never gets the gateway killed.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "The process answers", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize, ToSchema)]
struct Readiness {
    /// `ready`, `not_ready` or `draining`.
    status: &'static str,
    dependencies: Vec<DependencyState>,
    /// What works in a reduced way without failing readiness: `redis` (rate limits held per
    /// replica, idempotent retries not guaranteed), `auth_change_stream` (revocations since
    /// the disconnect not yet known).
    degraded: Vec<&'static str>,
}

/// Readiness: 200 only when every downstream service reports SERVING (checked in parallel,
/// each bounded by `GATEWAY_READY_TIMEOUT`); 503 otherwise and while draining. The
/// gateway's own Redis and auth's change stream only degrade it: they are named in
/// `degraded`, and the answer stays 200.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    responses(
        (status = 200, description = "Every service is serving", body = Readiness),
        (status = 503, description = "Not ready, or draining", body = Readiness),
    )
)]
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let timeout = state.config.ready_timeout;
    let (dependencies, redis) = tokio::join!(
        futures::future::join_all(
            state
                .upstreams
                .all()
                .map(|upstream| upstream.check(timeout)),
        ),
        tokio::time::timeout(timeout, platform::redis_pool::ping(&state.redis)),
    );
    let mut degraded = Vec::new();
    if !matches!(redis, Ok(Ok(()))) {
        degraded.push("redis");
    }
    if !state.identity.is_live() {
        degraded.push("auth_change_stream");
    }
    let status = if state.draining.load(Ordering::Relaxed) {
        "draining"
    } else if dependencies.iter().all(DependencyState::is_serving) {
        "ready"
    } else {
        "not_ready"
    };
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            status,
            dependencies,
            degraded,
        }),
    )
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain; version=0.0.4", body = String))
)]
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        platform::metrics::render(),
    )
}
