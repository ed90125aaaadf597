use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    str::FromStr,
    time::Duration,
};

use platform::{
    cli::{Binary, ShutdownSignal},
    config::Env,
    grpc::ClientConfig,
    identity::IdentityConfig,
    redis_pool::RedisConfig,
    shutdown::ShutdownConfig,
    telemetry::TelemetryConfig,
};
use tokio::net::TcpListener;

use crate::ratelimit::RateLimitConfig;

/// Everything the gateway reads from its environment (`GATEWAY_*`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `GATEWAY_LISTEN_ADDR`, default `127.0.0.1:8080`.
    pub listen_addr: SocketAddr,
    /// `GATEWAY_PROFILE_URL`, `GATEWAY_NOTES_URL`: where each service listens (auth's is
    /// `identity.auth_url`, `GATEWAY_AUTH_URL`).
    pub profile_url: String,
    pub notes_url: String,
    /// Verifying access tokens at the edge: `GATEWAY_AUTH_URL`, `GATEWAY_AUTH_CLIENT_SECRET`
    /// (or `_FILE`), `GATEWAY_TOKEN_ISSUER`, `GATEWAY_TOKEN_AUDIENCE`.
    pub identity: IdentityConfig,
    /// `GATEWAY_READY_TIMEOUT` (default 1s): how long `/ready` waits for each health check.
    pub ready_timeout: Duration,
    /// `GATEWAY_UPSTREAM_CONNECT_TIMEOUT` (1s) and `GATEWAY_UPSTREAM_TIMEOUT` (5s).
    pub upstream: ClientConfig,
    /// What guards every request at the edge: limits, deadlines, compression, CORS.
    pub edge: EdgeConfig,
    /// `GATEWAY_REDIS_*` (URL required): shared rate-limit state.
    pub redis: RedisConfig,
    /// `GATEWAY_RATE_LIMIT_*`, `GATEWAY_TRUSTED_PROXIES`.
    pub rate_limits: RateLimitConfig,
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
            identity: IdentityConfig::from_env(env),
            profile_url: env.or("PROFILE_URL", "http://127.0.0.1:50052".to_owned()),
            notes_url: env.or("NOTES_URL", "http://127.0.0.1:50053".to_owned()),
            ready_timeout: env.duration_or("READY_TIMEOUT", Self::DEFAULT_READY_TIMEOUT),
            upstream: ClientConfig {
                connect_timeout: env
                    .duration_or("UPSTREAM_CONNECT_TIMEOUT", defaults.connect_timeout),
                request_timeout: env.duration_or("UPSTREAM_TIMEOUT", defaults.request_timeout),
                resolve_interval: env
                    .duration_or("UPSTREAM_RESOLVE_INTERVAL", defaults.resolve_interval),
            },
            edge: EdgeConfig::from_env(env),
            redis: RedisConfig::from_env(env, "gateway:"),
            rate_limits: RateLimitConfig::from_env(env),
            shutdown: ShutdownConfig::from_env(env),
            telemetry: TelemetryConfig::from_env(env, "gateway"),
        };
        for (name, url) in [
            ("AUTH_URL", &config.identity.auth_url),
            ("PROFILE_URL", &config.profile_url),
            ("NOTES_URL", &config.notes_url),
        ] {
            // One URL, or a comma-separated list of replicas' URLs.
            if url.split(',').map(str::trim).any(|url| {
                url.parse::<http::Uri>()
                    .map_or(true, |uri| uri.scheme().is_none())
            }) {
                env.problem(&env.name(name), format!("`{url}` is not an http:// URL"));
            }
        }
        config
    }
}

/// The edge of the gateway: what every request goes through before a route sees it.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `GATEWAY_BODY_LIMIT` (default 1 MiB): the largest request body a route reads, unless
    /// the route raises its own limit.
    pub body_limit: usize,
    /// `GATEWAY_REQUEST_TIMEOUT` (default 10s): the deadline of an API request, passed on to
    /// the services as the gRPC deadline; past it the gateway answers 504.
    pub request_timeout: Duration,
    /// `GATEWAY_BATCH_REQUEST_TIMEOUT` (default 30s): the deadline of the batch routes
    /// (`/api/v1/notes/batch*`, up to 500 notes in one transaction), their own route class.
    pub batch_request_timeout: Duration,
    /// `GATEWAY_MAX_CONCURRENT_REQUESTS` (default 1024): API requests in flight at once; one
    /// more is shed at once with 503 rather than queued. `/health`, `/ready` and `/metrics`
    /// are never counted nor shed.
    pub max_concurrent_requests: usize,
    /// `GATEWAY_SLOW_REQUEST_THRESHOLD` (default 1s): requests slower than this are logged
    /// with their trace id; `0s` turns the log line off.
    pub slow_request_threshold: Duration,
    /// `GATEWAY_COMPRESSION_MIN_BYTES` (default 1024): responses of at least this size are
    /// compressed (gzip or brotli, as the client's `Accept-Encoding` allows).
    pub compression_min_bytes: u64,
    /// `GATEWAY_CORS_ALLOWED_ORIGINS` (default empty): origins allowed to call from a
    /// browser, comma-separated, or `*`; empty means no CORS headers at all.
    pub cors_allowed_origins: CorsOrigins,
}

impl EdgeConfig {
    pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_BATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;
    pub const DEFAULT_SLOW_REQUEST_THRESHOLD: Duration = Duration::from_secs(1);
    pub const DEFAULT_COMPRESSION_MIN_BYTES: u64 = 1024;

    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            body_limit: env.or("BODY_LIMIT", ByteSize(Self::DEFAULT_BODY_LIMIT)).0,
            request_timeout: env.duration_or("REQUEST_TIMEOUT", Self::DEFAULT_REQUEST_TIMEOUT),
            batch_request_timeout: env
                .duration_or("BATCH_REQUEST_TIMEOUT", Self::DEFAULT_BATCH_REQUEST_TIMEOUT),
            max_concurrent_requests: env.or(
                "MAX_CONCURRENT_REQUESTS",
                Self::DEFAULT_MAX_CONCURRENT_REQUESTS,
            ),
            slow_request_threshold: env.duration_or(
                "SLOW_REQUEST_THRESHOLD",
                Self::DEFAULT_SLOW_REQUEST_THRESHOLD,
            ),
            compression_min_bytes: env
                .or("COMPRESSION_MIN_BYTES", Self::DEFAULT_COMPRESSION_MIN_BYTES),
            cors_allowed_origins: env.or("CORS_ALLOWED_ORIGINS", CorsOrigins::default()),
        };
        if config.body_limit == 0 {
            env.problem(
                &env.name("BODY_LIMIT"),
                "must be at least 1 byte".to_owned(),
            );
        }
        for (name, timeout) in [
            ("REQUEST_TIMEOUT", config.request_timeout),
            ("BATCH_REQUEST_TIMEOUT", config.batch_request_timeout),
        ] {
            if timeout.is_zero() {
                env.problem(&env.name(name), "must be longer than 0s".to_owned());
            }
        }
        if config.max_concurrent_requests == 0 {
            env.problem(
                &env.name("MAX_CONCURRENT_REQUESTS"),
                "must be at least 1".to_owned(),
            );
        }
        config
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            body_limit: Self::DEFAULT_BODY_LIMIT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            batch_request_timeout: Self::DEFAULT_BATCH_REQUEST_TIMEOUT,
            max_concurrent_requests: Self::DEFAULT_MAX_CONCURRENT_REQUESTS,
            slow_request_threshold: Self::DEFAULT_SLOW_REQUEST_THRESHOLD,
            compression_min_bytes: Self::DEFAULT_COMPRESSION_MIN_BYTES,
            cors_allowed_origins: CorsOrigins::default(),
        }
    }
}

/// A size in bytes: `1048576`, `512KiB`, `1MiB` (binary units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let multiplier: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1024,
            "MiB" => 1024 * 1024,
            "GiB" => 1024 * 1024 * 1024,
            _ => {
                return Err(format!(
                    "`{s}` has no known unit; write bytes like 65536, 512KiB or 1MiB"
                ));
            }
        };
        digits
            .parse::<usize>()
            .ok()
            .and_then(|amount| amount.checked_mul(multiplier))
            .map(Self)
            .ok_or_else(|| format!("`{s}` is not a size; write it like 65536, 512KiB or 1MiB"))
    }
}

/// The origins allowed by CORS: none (CORS off), any (`*`), or a list of exact origins
/// such as `https://app.example.com`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    #[default]
    None,
    Any,
    List(Vec<http::HeaderValue>),
}

impl FromStr for CorsOrigins {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let origins: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .collect();
        match origins.as_slice() {
            [] => Ok(Self::None),
            ["*"] => Ok(Self::Any),
            _ => origins
                .iter()
                .map(|origin| parse_origin(origin))
                .collect::<Result<_, _>>()
                .map(Self::List),
        }
    }
}

/// An origin is `scheme://host[:port]`, exactly as browsers send it: no path, no `*` among
/// other origins.
fn parse_origin(origin: &str) -> Result<http::HeaderValue, String> {
    let problem = || {
        format!(
            "`{origin}` is not an origin; write it like https://app.example.com (or use * alone)"
        )
    };
    let uri: http::Uri = origin.parse().map_err(|_| problem())?;
    let bare = uri.scheme().is_some()
        && uri.authority().is_some()
        // `Uri` reports an absent path as `/`; a written one, even `/`, is not an origin.
        && uri.path() == "/"
        && uri.query().is_none()
        && !origin.ends_with('/');
    if !bare {
        return Err(problem());
    }
    http::HeaderValue::from_str(origin).map_err(|_| problem())
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

    /// The variables given, plus the one secret every gateway needs.
    fn env<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Env {
        let required = [
            (
                "GATEWAY_AUTH_CLIENT_SECRET",
                "0123456789abcdef0123456789abcdef",
            ),
            ("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        ];
        Env::from_pairs("GATEWAY", required.into_iter().chain(pairs))
    }

    #[test]
    fn the_client_secret_and_redis_are_required() {
        let env = Env::from_pairs("GATEWAY", std::iter::empty::<(String, String)>());
        let _ = Config::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        let mut variables: Vec<&str> = problems.iter().map(|p| p.variable.as_str()).collect();
        variables.sort_unstable();
        assert_eq!(
            variables,
            ["GATEWAY_AUTH_CLIENT_SECRET", "GATEWAY_REDIS_URL"]
        );
    }

    #[test]
    fn names_the_bad_upstream_variable() {
        let env = env([("GATEWAY_NOTES_URL", "127.0.0.1:50053")]);
        let _ = Config::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].variable, "GATEWAY_NOTES_URL");
    }

    #[test]
    fn edge_defaults_apply_when_nothing_is_set() {
        let env = env([]);
        let config = Config::from_env(&env);
        assert!(env.finish().is_ok());
        assert_eq!(config.edge.body_limit, 1024 * 1024);
        assert_eq!(config.edge.request_timeout, Duration::from_secs(10));
        assert_eq!(config.edge.max_concurrent_requests, 1024);
        assert_eq!(config.edge.slow_request_threshold, Duration::from_secs(1));
        assert_eq!(config.edge.compression_min_bytes, 1024);
        assert_eq!(config.edge.cors_allowed_origins, CorsOrigins::None);
    }

    #[test]
    fn edge_settings_parse_with_units() {
        let env = env([
            ("GATEWAY_BODY_LIMIT", "512KiB"),
            ("GATEWAY_REQUEST_TIMEOUT", "250ms"),
            ("GATEWAY_MAX_CONCURRENT_REQUESTS", "8"),
            ("GATEWAY_SLOW_REQUEST_THRESHOLD", "0s"),
            ("GATEWAY_COMPRESSION_MIN_BYTES", "2048"),
            (
                "GATEWAY_CORS_ALLOWED_ORIGINS",
                "https://app.example.com, http://localhost:3000",
            ),
        ]);
        let edge = Config::from_env(&env).edge;
        assert_eq!(env.finish(), Ok(()));
        assert_eq!(edge.body_limit, 512 * 1024);
        assert_eq!(edge.request_timeout, Duration::from_millis(250));
        assert_eq!(edge.max_concurrent_requests, 8);
        assert!(edge.slow_request_threshold.is_zero());
        assert_eq!(edge.compression_min_bytes, 2048);
        let CorsOrigins::List(origins) = edge.cors_allowed_origins else {
            panic!("a list of origins");
        };
        assert_eq!(origins.len(), 2);
    }

    #[test]
    fn names_every_bad_edge_variable() {
        let env = env([
            ("GATEWAY_BODY_LIMIT", "1 megabyte"),
            ("GATEWAY_REQUEST_TIMEOUT", "0s"),
            ("GATEWAY_MAX_CONCURRENT_REQUESTS", "0"),
            ("GATEWAY_COMPRESSION_MIN_BYTES", "-1"),
            (
                "GATEWAY_CORS_ALLOWED_ORIGINS",
                "https://a.example.com/path, *",
            ),
        ]);
        let _ = Config::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        let mut variables: Vec<&str> = problems.iter().map(|p| p.variable.as_str()).collect();
        variables.sort_unstable();
        assert_eq!(
            variables,
            [
                "GATEWAY_BODY_LIMIT",
                "GATEWAY_COMPRESSION_MIN_BYTES",
                "GATEWAY_CORS_ALLOWED_ORIGINS",
                "GATEWAY_MAX_CONCURRENT_REQUESTS",
                "GATEWAY_REQUEST_TIMEOUT",
            ]
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("65536".parse(), Ok(ByteSize(65536)));
        assert_eq!("1MiB".parse(), Ok(ByteSize(1024 * 1024)));
        assert_eq!("2 KiB".parse(), Ok(ByteSize(2048)));
        assert!("1MB".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
    }
}
