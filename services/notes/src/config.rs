use platform::{
    cli::ShutdownSignal,
    config::Env,
    identity::IdentityConfig,
    service::{GrpcService, ServiceConfig},
};
use tokio::net::TcpListener;

use crate::{SPEC, cache::CacheConfig};

/// Everything the notes service reads from its environment (`NOTES_*`).
#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    /// Auth, for verifying callers (`NOTES_AUTH_URL`, `NOTES_AUTH_CLIENT_SECRET`, …).
    pub identity: IdentityConfig,
    pub cache: CacheConfig,
}

impl GrpcService for Config {
    const SPEC: platform::service::ServiceSpec = SPEC;

    fn from_env(env: &Env) -> Self {
        Self {
            service: ServiceConfig::from_env(&SPEC, env),
            identity: IdentityConfig::from_env(env),
            cache: CacheConfig::from_env(env),
        }
    }

    fn service_config(&self) -> &ServiceConfig {
        &self.service
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }
}
