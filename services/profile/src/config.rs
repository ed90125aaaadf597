use platform::{
    cli::ShutdownSignal,
    config::Env,
    service::{GrpcService, ServiceConfig},
};
use tokio::net::TcpListener;

use crate::SPEC;

/// Everything the profile service reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
}

impl GrpcService for Config {
    const SPEC: platform::service::ServiceSpec = SPEC;

    fn from_env(env: &Env) -> Self {
        Self {
            service: ServiceConfig::from_env(&SPEC, env),
        }
    }

    fn service_config(&self) -> &ServiceConfig {
        &self.service
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }
}
