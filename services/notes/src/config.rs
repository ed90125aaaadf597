use platform::{
    cli::ShutdownSignal,
    config::Env,
    identity::IdentityConfig,
    service::{GrpcService, ServiceConfig},
};
use tokio::net::TcpListener;

use std::time::Duration;

use crate::{SPEC, cache::CacheConfig, jobs::JobConfig, openai::OpenAiConfig};

/// Everything the notes service reads from its environment (`NOTES_*`).
#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    /// Auth, for verifying callers (`NOTES_AUTH_URL`, `NOTES_AUTH_CLIENT_SECRET`, …).
    pub identity: IdentityConfig,
    pub cache: CacheConfig,
    pub jobs: JobConfig,
    /// `NOTES_GENERATOR` (default `builtin`): what runs generation jobs; `openai` = the
    /// OpenAI-compatible endpoint of the `NOTES_OPENAI_*` settings.
    pub openai: Option<OpenAiConfig>,
    /// `NOTES_PROFILE_URL` (default `http://127.0.0.1:50052`): profile, for each user's plan
    /// (`GetEntitlements`) when a generation is requested.
    pub profile_url: String,
    /// `NOTES_NOTIFICATION_HEARTBEAT` (default 15s): the longest silence on a notification
    /// stream before a heartbeat.
    pub notification_heartbeat: Duration,
    /// `NOTES_NOTIFICATION_READ_RETENTION` (default 30 days): read notifications older than
    /// this are deleted.
    pub notification_read_retention: Duration,
}

impl Config {
    pub const DEFAULT_PROFILE_URL: &str = "http://127.0.0.1:50052";
}

impl GrpcService for Config {
    const SPEC: platform::service::ServiceSpec = SPEC;

    fn from_env(env: &Env) -> Self {
        Self {
            service: ServiceConfig::from_env(&SPEC, env),
            identity: IdentityConfig::from_env(env),
            cache: CacheConfig::from_env(env),
            jobs: JobConfig::from_env(env),
            openai: match env.or("GENERATOR", "builtin".to_owned()).as_str() {
                "builtin" => None,
                "openai" => Some(OpenAiConfig::from_env(env)),
                other => {
                    env.problem(
                        &env.name("GENERATOR"),
                        format!("`{other}` is not a generator: builtin or openai"),
                    );
                    None
                }
            },
            profile_url: env.or("PROFILE_URL", Self::DEFAULT_PROFILE_URL.to_owned()),
            notification_heartbeat: env
                .duration_or("NOTIFICATION_HEARTBEAT", Duration::from_secs(15)),
            notification_read_retention: env.duration_or(
                "NOTIFICATION_READ_RETENTION",
                Duration::from_secs(30 * 24 * 3600),
            ),
        }
    }

    fn service_config(&self) -> &ServiceConfig {
        &self.service
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }
}
