//! The Redis pool every service builds the same way (bb8 over multiplexed connections).

use std::time::Duration;

use bb8_redis::{RedisConnectionManager, bb8};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value, aio::MultiplexedConnection};

use crate::config::{Env, Secret};

pub type RedisPool = bb8::Pool<RedisManager>;

/// bb8-redis's manager, plus what it lacks: a connection whose last command found it dead
/// (closed by Redis, a restart, a network reset) is dropped when it returns to the pool
/// instead of being handed out again. A multiplexed connection never reconnects, and
/// bb8-redis reports none broken, so without this every pooled connection would keep
/// failing after Redis came back, until its maximum lifetime.
#[derive(Debug, Clone)]
pub struct RedisManager(RedisConnectionManager);

/// A pooled connection: commands go to the multiplexed connection; a transport failure
/// marks it broken.
pub struct RedisConnection {
    inner: MultiplexedConnection,
    broken: bool,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl RedisConnection {
    fn observe<T>(&mut self, result: Result<T, RedisError>) -> Result<T, RedisError> {
        if let Err(error) = &result
            && (error.is_io_error()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.is_unrecoverable_error())
        {
            self.broken = true;
        }
        result
    }
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.observe(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.observe(result)
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
            inner: self.0.connect().await?,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        let result = self.0.is_valid(&mut conn.inner).await;
        conn.observe(result)
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
    let manager = RedisManager(RedisConnectionManager::new(config.url.expose())?);
    Ok(bb8::Pool::builder()
        .max_size(config.max_connections)
        .min_idle(Some(0))
        .connection_timeout(config.connection_timeout)
        // A broken multiplexed connection is detected by the failing command and dropped on
        // its return (see `RedisManager`); a ping per checkout would double the round trips.
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
