//! The Redis pool every service builds the same way (bb8 over multiplexed connections).

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
};

use crate::config::{Env, Secret};

pub type RedisPool = bb8::Pool<RedisManager>;

/// bb8's manager for multiplexed Redis connections that notices when one broke.
///
/// A multiplexed connection whose socket died (Redis restarted, a failover, a black-holed
/// network) never heals, and bb8 only drops a connection its manager calls broken: without
/// this, a pool would keep failing on dead connections after Redis came back.
#[derive(Debug, Clone)]
pub struct RedisManager {
    client: redis::Client,
}

impl RedisManager {
    pub fn new(url: &str) -> Result<Self, RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
        })
    }
}

/// A pooled connection: the multiplexed connection and whether it is still usable.
#[derive(Clone)]
pub struct RedisConnection {
    inner: MultiplexedConnection,
    /// Set while a command is in flight and kept when it fails at the connection level or is
    /// abandoned (a caller's timeout): such a connection is dropped when returned.
    broken: bool,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Errors after which a connection cannot be trusted with another command.
fn breaks_connection(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.is_timeout()
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.broken = true;
            let result = self.inner.req_packed_command(cmd).await;
            self.broken = result.as_ref().is_err_and(breaks_connection);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.broken = true;
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.broken = result.as_ref().is_err_and(breaks_connection);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

impl bb8::ManageConnection for RedisManager {
    type Connection = RedisConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        Ok(RedisConnection {
            inner: self.client.get_multiplexed_async_connection().await?,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        let _: String = redis::cmd("PING").query_async(conn).await?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken
    }
}

/// Redis settings (`<PREFIX>_REDIS_*`).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `<PREFIX>_REDIS_URL`, required: `redis://[:password@]host:port/db`.
    pub url: Secret,
    /// Every key this service writes starts with this, so services sharing one Redis (and
    /// tests sharing one server) never see each other's keys.
    pub key_prefix: String,
    /// Each pooled connection is multiplexed, so a few serve many concurrent requests.
    pub max_connections: u32,
    /// How long a request waits for a connection before the cache is skipped.
    pub connection_timeout: Duration,
}

impl RedisConfig {
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
    pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);

    pub fn from_env(env: &Env, default_key_prefix: &str) -> Self {
        let config = Self {
            url: env.required("REDIS_URL"),
            key_prefix: env.or("REDIS_KEY_PREFIX", default_key_prefix.to_owned()),
            max_connections: env.or("REDIS_MAX_CONNECTIONS", Self::DEFAULT_MAX_CONNECTIONS),
            connection_timeout: env
                .duration_or("REDIS_CONNECTION_TIMEOUT", Self::DEFAULT_CONNECTION_TIMEOUT),
        };
        if config.max_connections == 0 {
            env.problem(
                &env.name("REDIS_MAX_CONNECTIONS"),
                "must be at least 1".to_owned(),
            );
        }
        if !config.url.expose().is_empty() && redis::Client::open(config.url.expose()).is_err() {
            env.problem(
                &env.name("REDIS_URL"),
                "is not a valid redis:// URL".to_owned(),
            );
        }
        config
    }

    /// `<prefix><suffix>`: the one way keys are spelled.
    pub fn key(&self, suffix: &str) -> String {
        let mut key = String::with_capacity(self.key_prefix.len() + suffix.len());
        key.push_str(&self.key_prefix);
        key.push_str(suffix);
        key
    }
}

/// A pool that connects on first use: a service starts, and serves from Postgres, while its
/// Redis is down.
pub fn lazy_pool(config: &RedisConfig) -> Result<RedisPool, redis::RedisError> {
    let manager = RedisManager::new(config.url.expose())?;
    Ok(bb8::Pool::builder()
        .max_size(config.max_connections)
        .min_idle(Some(0))
        .connection_timeout(config.connection_timeout)
        // A broken multiplexed connection is detected by the failing command (and dropped by
        // `RedisManager::has_broken`); a ping per checkout would double the round trips.
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// One round trip that proves Redis answers.
pub async fn ping(pool: &RedisPool) -> Result<(), RedisPingError> {
    let mut conn = pool.get().await.map_err(|e| match e {
        bb8::RunError::User(e) => RedisPingError::Redis(e),
        bb8::RunError::TimedOut => RedisPingError::TimedOut,
    })?;
    let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RedisPingError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: timed out waiting for a connection")]
    TimedOut,
}

/// A span per Redis round trip, named by what it does (`auth.throttle.count`,
/// `gateway.ratelimit.check`): never the key or the values, which may name a user. A failed
/// command marks its span as an error.
pub trait CommandSpan: std::future::Future + Sized {
    fn command(self, summary: &'static str) -> impl std::future::Future<Output = Self::Output>;
}

impl<F, T> CommandSpan for F
where
    F: std::future::Future<Output = Result<T, RedisError>>,
{
    fn command(self, summary: &'static str) -> impl std::future::Future<Output = Self::Output> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "redis.command",
            otel.name = summary,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "redis",
            db.query.summary = summary,
            error.type = tracing::field::Empty,
        );
        let recorded = span.clone();
        async move {
            let result = self.instrument(span).await;
            if let Err(error) = &result {
                recorded.record("otel.status_code", "ERROR");
                recorded.record("error.type", error.category());
            }
            result
        }
    }
}
