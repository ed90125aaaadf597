//! Graceful shutdown: the signal that starts it and the settings that bound it.
//!
//! Every binary drains the same way: report NOT_SERVING (health, `/ready`), keep serving for
//! `drain_delay` so load balancers and probes notice, stop accepting, let in-flight requests
//! finish, and exit once they have or when `grace_period` (counted from the signal) runs out.

use std::time::Duration;

use crate::config::Env;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// From the signal to exit, whatever is still in flight. Keep it below the
    /// orchestrator's own deadline (Kubernetes' `terminationGracePeriodSeconds`).
    pub grace_period: Duration,
    /// How long NOT_SERVING is reported while still accepting requests.
    pub drain_delay: Duration,
}

impl ShutdownConfig {
    pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(20);
    pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(1);

    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            grace_period: env.duration_or("SHUTDOWN_GRACE_PERIOD", Self::DEFAULT_GRACE_PERIOD),
            drain_delay: env.duration_or("SHUTDOWN_DRAIN_DELAY", Self::DEFAULT_DRAIN_DELAY),
        };
        if config.drain_delay > config.grace_period {
            env.problem(
                &env.name("SHUTDOWN_DRAIN_DELAY"),
                format!(
                    "is longer than {} ({:?})",
                    env.name("SHUTDOWN_GRACE_PERIOD"),
                    config.grace_period
                ),
            );
        }
        config
    }

    /// What is left of the grace period once the drain delay has passed.
    pub fn in_flight_deadline(&self) -> Duration {
        self.grace_period.saturating_sub(self.drain_delay)
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}
