//! The gateway: the HTTP/JSON front door mobile clients live on, routing onto the gRPC
//! services.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// Settings (`GATEWAY_*` environment variables).
pub mod config;
/// Per-request middleware: request id, span, metrics.
mod middleware;
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
    /// Set once shutdown starts: `/ready` answers 503 so load balancers move traffic away.
    pub draining: Arc<AtomicBool>,
}

/// The whole HTTP application, middleware included.
pub fn app(state: AppState) -> Router {
    middleware::apply(routes::router(state))
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains: `/ready` turns
/// 503 for the drain delay, the listener closes, and in-flight requests get what is left of
/// the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Install the recorder before the first request records anything.
    platform::metrics::handle();
    let state = AppState {
        upstreams: Upstreams::connect(&config)?,
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
    let server = axum::serve(listener, app(state))
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
