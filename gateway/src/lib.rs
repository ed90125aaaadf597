//! The gateway: the HTTP/JSON front door mobile clients live on, routing onto the gRPC
//! services.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// Settings (`GATEWAY_*` environment variables).
pub mod config;
/// What a handler knows of its request: request id, trace id, deadline; passing them on to
/// services.
pub mod context;
/// `ApiError`: every failure as RFC 9457 problem details; the gRPC-to-HTTP status table.
pub mod error;
/// Extractors that reject with `ApiError`: `ApiJson`.
pub mod extract;
/// `Idempotency-Key`: stored responses replayed to retries of signed-in writes.
pub mod idempotency;
/// What wraps every request: request id, span, metrics, problem bodies, compression, CORS,
/// and for API routes load shedding, deadlines and body limits.
mod middleware;
/// The OpenAPI document at `/openapi.json` and its page at `/docs`.
pub mod openapi;
/// Rate limits per user, per client address and per route class, shared through Redis.
pub mod ratelimit;
/// Every route, one module per concern.
pub mod routes;
/// The gRPC services behind the gateway and their health.
pub mod upstream;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, serve::ListenerExt as _};
use tokio::net::TcpListener;

pub use config::Config;

use upstream::Upstreams;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub upstreams: Upstreams,
    /// Verifies access tokens locally, with auth's key set and revocations.
    pub identity: platform::identity::Identity,
    pub rate_limiter: ratelimit::RateLimiter,
    pub idempotency: idempotency::IdempotencyStore,
    /// The gateway's Redis (rate limits, idempotency), for readiness.
    pub redis: platform::redis_pool::RedisPool,
    /// Set once shutdown starts: `/ready` answers 503 so load balancers move traffic away.
    pub draining: Arc<AtomicBool>,
}

/// The whole HTTP application, middleware included.
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// The application with `extra_api_routes` served beside the gateway's own API routes,
/// behind the same edge guard and middleware (tests and benchmarks mount routes this way).
pub fn app_with(state: AppState, extra_api_routes: Router<AppState>) -> Router {
    let edge = middleware::Edge::new(
        &state.config.edge,
        state.rate_limiter.clone(),
        state.idempotency.clone(),
    );
    middleware::apply(routes::router(&edge, extra_api_routes), &edge).with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains: `/ready` turns
/// 503 for the drain delay, the listener closes, and in-flight requests get what is left of
/// the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, Router::new(), listener, shutdown).await
}

/// [`serve`] with extra API routes (see [`app_with`]).
pub async fn serve_with(
    config: Config,
    extra_api_routes: Router<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Install the recorder before the first request records anything.
    platform::metrics::handle();
    let upstreams = Upstreams::connect(&config)?;
    let identity = platform::identity::Identity::start(
        &config.identity,
        "gateway",
        upstreams.auth.channel.clone(),
        false,
    );
    let redis = platform::redis_pool::lazy_pool(&config.redis)?;
    let rate_limiter = ratelimit::RateLimiter::new(
        config.rate_limits.clone(),
        identity.clone(),
        redis.clone(),
        config.redis.clone(),
    );
    let idempotency = idempotency::IdempotencyStore::new(
        redis.clone(),
        config.redis.clone(),
        config.edge.body_limit.max(routes::LARGEST_ROUTE_BODY_LIMIT),
    );
    let state = AppState {
        upstreams,
        identity,
        rate_limiter,
        idempotency,
        redis,
        config: Arc::new(config),
        draining: Arc::new(AtomicBool::new(false)),
    };
    let shutdown_config = state.config.shutdown;
    let draining = state.draining.clone();
    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();

    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // The peer address reaches handlers as `ConnectInfo<SocketAddr>`: the client IP when no
    // trusted proxy stands in front.
    let app = app_with(state, extra_api_routes)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = accepting_stopped.await;
        })
        .into_future();
    tokio::pin!(server);
    tokio::pin!(shutdown);

    tokio::select! {
        result = &mut server => {
            result?;
            anyhow::bail!("the HTTP server stopped on its own");
        }
        () = &mut shutdown => {}
    }

    draining.store(true, Ordering::Relaxed);
    tracing::info!(
        drain_delay = ?shutdown_config.drain_delay,
        grace_period = ?shutdown_config.grace_period,
        "shutting down: /ready reports draining"
    );
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = tokio::time::sleep(shutdown_config.drain_delay) => {}
    }
    let _ = stop_accepting.send(());
    match tokio::time::timeout(shutdown_config.in_flight_deadline(), &mut server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over: cutting the requests still in flight"),
    }
    tracing::info!("stopped");
    Ok(())
}
