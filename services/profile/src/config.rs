use std::time::Duration;

use platform::{
    cache::CacheSettings,
    cli::ShutdownSignal,
    config::Env,
    identity::IdentityConfig,
    service::{GrpcService, ServiceConfig},
};
use tokio::net::TcpListener;

use crate::SPEC;

/// Everything the profile service reads from its environment (`PROFILE_*`).
#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    /// `PROFILE_AUTH_URL`, `PROFILE_AUTH_CLIENT_SECRET`, ...: the auth service, for the key
    /// set, users' email and roles, and its change stream.
    pub identity: IdentityConfig,
    pub cache: CacheConfig,
    pub warming: WarmingConfig,
}

/// The caches' sizes and lifetimes (`PROFILE_CACHE_*`).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub settings: CacheSettings,
    /// `PROFILE_CACHE_L1_TTL` (default 30s): the longest an in-process copy lives; the
    /// staleness bound while a replica cannot hear invalidations.
    pub l1_ttl: Duration,
    /// `PROFILE_CACHE_L1_MAX_ENTRIES` (default 100000) profiles per replica.
    pub l1_max_entries: u64,
    /// `PROFILE_CACHE_L2_TTL` (default 15m): profiles in Redis.
    pub l2_ttl: Duration,
    /// `PROFILE_CATALOG_CACHE_TTL` (default 1h): catalogs and plans, both levels.
    pub catalog_ttl: Duration,
    /// `PROFILE_AUTH_CACHE_TTL` (default 60s, at most 60s): email and roles from auth, both
    /// levels; auth's change events evict sooner.
    pub auth_ttl: Duration,
}

impl CacheConfig {
    pub const DEFAULT_L1_TTL: Duration = Duration::from_secs(30);
    pub const DEFAULT_L1_MAX_ENTRIES: u64 = 100_000;
    pub const DEFAULT_L2_TTL: Duration = Duration::from_secs(15 * 60);
    pub const DEFAULT_CATALOG_TTL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_AUTH_TTL: Duration = Duration::from_secs(60);
    /// Roles owned by auth must reach profile within this, event or not.
    pub const MAX_AUTH_TTL: Duration = Duration::from_secs(60);

    fn from_env(env: &Env) -> Self {
        let config = Self {
            settings: CacheSettings::from_env(env),
            l1_ttl: env.duration_or("CACHE_L1_TTL", Self::DEFAULT_L1_TTL),
            l1_max_entries: env.or("CACHE_L1_MAX_ENTRIES", Self::DEFAULT_L1_MAX_ENTRIES),
            l2_ttl: env.duration_or("CACHE_L2_TTL", Self::DEFAULT_L2_TTL),
            catalog_ttl: env.duration_or("CATALOG_CACHE_TTL", Self::DEFAULT_CATALOG_TTL),
            auth_ttl: env.duration_or("AUTH_CACHE_TTL", Self::DEFAULT_AUTH_TTL),
        };
        for (name, value) in [
            ("CACHE_L1_TTL", config.l1_ttl),
            ("CACHE_L2_TTL", config.l2_ttl),
            ("CATALOG_CACHE_TTL", config.catalog_ttl),
            ("AUTH_CACHE_TTL", config.auth_ttl),
        ] {
            if value.is_zero() {
                env.problem(&env.name(name), "must be above 0".to_owned());
            }
        }
        if config.auth_ttl > Self::MAX_AUTH_TTL {
            env.problem(
                &env.name("AUTH_CACHE_TTL"),
                "must be at most 60s: roles from auth must never be staler".to_owned(),
            );
        }
        if config.l1_max_entries == 0 {
            env.problem(
                &env.name("CACHE_L1_MAX_ENTRIES"),
                "must be at least 1".to_owned(),
            );
        }
        config
    }
}

/// Cache warming (`PROFILE_WARM_*`).
#[derive(Debug, Clone)]
pub struct WarmingConfig {
    /// `PROFILE_WARM_ON_START` (default true): load recently active users' profiles at
    /// start-up.
    pub on_start: bool,
    /// `PROFILE_WARM_WINDOW` (default 24h): "recently active".
    pub window: Duration,
    /// `PROFILE_WARM_MAX_PER_SECOND` (default 200): the rate bound of a warm-up.
    pub max_per_second: u32,
    /// `PROFILE_WARM_MAX_PROFILES` (default 100000): the most profiles one warm-up loads.
    pub max_profiles: u32,
    /// `PROFILE_ACTIVITY_FLUSH_INTERVAL` (default 1m): how often the users seen reading
    /// their profile are written to Postgres for warming.
    pub activity_flush_interval: Duration,
}

impl WarmingConfig {
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_MAX_PER_SECOND: u32 = 200;
    pub const DEFAULT_MAX_PROFILES: u32 = 100_000;
    pub const DEFAULT_ACTIVITY_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

    fn from_env(env: &Env) -> Self {
        let config = Self {
            on_start: env.or("WARM_ON_START", true),
            window: env.duration_or("WARM_WINDOW", Self::DEFAULT_WINDOW),
            max_per_second: env.or("WARM_MAX_PER_SECOND", Self::DEFAULT_MAX_PER_SECOND),
            max_profiles: env.or("WARM_MAX_PROFILES", Self::DEFAULT_MAX_PROFILES),
            activity_flush_interval: env.duration_or(
                "ACTIVITY_FLUSH_INTERVAL",
                Self::DEFAULT_ACTIVITY_FLUSH_INTERVAL,
            ),
        };
        if config.activity_flush_interval.is_zero() {
            env.problem(
                &env.name("ACTIVITY_FLUSH_INTERVAL"),
                "must be above 0".to_owned(),
            );
        }
        if config.max_per_second == 0 {
            env.problem(
                &env.name("WARM_MAX_PER_SECOND"),
                "must be at least 1".to_owned(),
            );
        }
        config
    }
}

impl GrpcService for Config {
    const SPEC: platform::service::ServiceSpec = SPEC;

    fn from_env(env: &Env) -> Self {
        Self {
            service: ServiceConfig::from_env(&SPEC, env),
            identity: IdentityConfig::from_env(env),
            cache: CacheConfig::from_env(env),
            warming: WarmingConfig::from_env(env),
        }
    }

    fn service_config(&self) -> &ServiceConfig {
        &self.service
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_cannot_be_cached_past_the_bound() {
        let env = Env::from_pairs(
            "PROFILE",
            [
                ("PROFILE_DATABASE_URL", "postgres://app@127.0.0.1:1/profile"),
                ("PROFILE_REDIS_URL", "redis://127.0.0.1:1/0"),
                (
                    "PROFILE_AUTH_CLIENT_SECRET",
                    "a-secret-of-enough-length-0123456789",
                ),
                ("PROFILE_AUTH_CACHE_TTL", "5m"),
                ("PROFILE_CACHE_L1_TTL", "0s"),
            ],
        );
        let _ = <Config as GrpcService>::from_env(&env);
        let variables: Vec<String> = env
            .finish()
            .err()
            .map(|e| e.problems.into_iter().map(|p| p.variable).collect())
            .unwrap_or_default();
        assert_eq!(
            variables,
            ["PROFILE_CACHE_L1_TTL", "PROFILE_AUTH_CACHE_TTL"]
        );
    }
}
