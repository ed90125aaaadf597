use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use platform::{
    cli::{Binary, ShutdownSignal},
    config::Env,
    grpc::ClientConfig,
    shutdown::ShutdownConfig,
    telemetry::TelemetryConfig,
};
use tokio::net::TcpListener;

/// Everything the gateway reads from its environment (`GATEWAY_*`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `GATEWAY_LISTEN_ADDR`, default `127.0.0.1:8080`.
    pub listen_addr: SocketAddr,
    /// `GATEWAY_AUTH_URL`, `GATEWAY_PROFILE_URL`, `GATEWAY_NOTES_URL`: where each service listens.
    pub auth_url: String,
    pub profile_url: String,
    pub notes_url: String,
    /// `GATEWAY_READY_TIMEOUT` (default 1s): how long `/ready` waits for each health check.
    pub ready_timeout: Duration,
    /// `GATEWAY_UPSTREAM_CONNECT_TIMEOUT` (1s) and `GATEWAY_UPSTREAM_TIMEOUT` (10s).
    pub upstream: ClientConfig,
    pub shutdown: ShutdownConfig,
    pub telemetry: TelemetryConfig,
}

impl Config {
    pub const DEFAULT_PORT: u16 = 8080;
    pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn from_env(env: &Env) -> Self {
        let defaults = ClientConfig::default();
        let config = Self {
            listen_addr: env.addr_or(
                "LISTEN_ADDR",
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, Self::DEFAULT_PORT)),
            ),
            auth_url: env.or("AUTH_URL", "http://127.0.0.1:50051".to_owned()),
            profile_url: env.or("PROFILE_URL", "http://127.0.0.1:50052".to_owned()),
            notes_url: env.or("NOTES_URL", "http://127.0.0.1:50053".to_owned()),
            ready_timeout: env.duration_or("READY_TIMEOUT", Self::DEFAULT_READY_TIMEOUT),
            upstream: ClientConfig {
                connect_timeout: env
                    .duration_or("UPSTREAM_CONNECT_TIMEOUT", defaults.connect_timeout),
                request_timeout: env.duration_or("UPSTREAM_TIMEOUT", defaults.request_timeout),
            },
            shutdown: ShutdownConfig::from_env(env),
            telemetry: TelemetryConfig::from_env(env, "gateway"),
        };
        for (name, url) in [
            ("AUTH_URL", &config.auth_url),
            ("PROFILE_URL", &config.profile_url),
            ("NOTES_URL", &config.notes_url),
        ] {
            if url
                .parse::<http::Uri>()
                .map_or(true, |uri| uri.scheme().is_none())
            {
                env.problem(&env.name(name), format!("`{url}` is not an http:// URL"));
            }
        }
        config
    }
}

impl Binary for Config {
    const NAME: &'static str = "gateway";
    const ENV_PREFIX: &'static str = "GATEWAY";

    fn from_env(env: &Env) -> Self {
        Config::from_env(env)
    }

    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }

    fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }

    fn migrate(self) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        None::<std::future::Ready<anyhow::Result<()>>>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_bad_upstream_variable() {
        let env = Env::from_pairs("GATEWAY", [("GATEWAY_NOTES_URL", "127.0.0.1:50053")]);
        let _ = Config::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].variable, "GATEWAY_NOTES_URL");
    }
}
