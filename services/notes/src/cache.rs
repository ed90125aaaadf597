//! The Redis cache of note details (10 min) and list pages (3 min): key scheme, TTLs and the
//! encoded shapes, in one place.
//!
//! # Invalidation: a version per user
//!
//! Every entry's key carries its owner's cache version: `<prefix>n1:{<user>}:<version>:d:<note>`
//! and `…:l:<list request digest>`. A write bumps the user's version once (one round trip,
//! after its commit and before it returns), which orphans every detail and every list page of
//! that user at once, on every replica: they are never read again and expire by their TTL.
//! No pattern delete, no scan.
//!
//! - **No stale fill.** A read takes the version and the entry in one script call, before it
//!   loads from Postgres, and fills under that version. A write that commits after the read
//!   bumps the version after it, so a fill of older data lands under a version nobody reads.
//! - **Versions never repeat.** A missing version key starts at Redis' clock in microseconds,
//!   and a bump sets it to `max(version + 1, clock)`; so a version key lost to eviction or
//!   expiry cannot come back to a number whose entries may still exist.
//! - **Redis down.** Every call is bounded by `CACHE_REDIS_TIMEOUT` and guarded by a breaker:
//!   after a failure Redis is skipped for `CACHE_BREAKER_COOLDOWN` (reads go to Postgres
//!   without a timeout per request), then one call probes it. A bump that could not reach Redis
//!   is remembered and replayed before this replica reads from the cache again; past
//!   [`PENDING_MAX`] users, the replica stops reading cached entries for one detail TTL
//!   after Redis is back instead. Only a replica that dies with bumps pending, or one cut off
//!   from Redis while others are not, can leave an entry older than a write: for at most its
//!   TTL.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use platform::{
    config::Env,
    redis_pool::{RedisConfig, RedisPool},
};
use prost::Message;
use uuid::Uuid;

/// Part of every key: bump it when an encoded shape changes, so a deploy never decodes
/// entries written by the previous version.
const SCHEMA: &str = "n1";
/// A user's version key lives this long after their last write (reads re-create it).
const VERSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Larger values are not cached: a note that big is read from Postgres each time.
pub const MAX_VALUE_BYTES: usize = 2 * 1024 * 1024;
/// Users whose bumps may wait for Redis before the replica gives up remembering them.
pub const PENDING_MAX: usize = 10_000;

/// Cache settings (`NOTES_CACHE_*`).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `NOTES_CACHE_DETAIL_TTL` (default 10m): how long a note's detail is kept.
    pub detail_ttl: Duration,
    /// `NOTES_CACHE_LIST_TTL` (default 3m): how long a list page is kept.
    pub list_ttl: Duration,
    /// `NOTES_CACHE_REDIS_TIMEOUT` (default 100ms): bound on each cache call to Redis.
    pub redis_timeout: Duration,
    /// `NOTES_CACHE_BREAKER_COOLDOWN` (default 5s): how long Redis is skipped after a failure.
    pub breaker_cooldown: Duration,
}

impl CacheConfig {
    pub const DEFAULT_DETAIL_TTL: Duration = Duration::from_secs(10 * 60);
    pub const DEFAULT_LIST_TTL: Duration = Duration::from_secs(3 * 60);
    pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
    pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);

    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            detail_ttl: env.duration_or("CACHE_DETAIL_TTL", Self::DEFAULT_DETAIL_TTL),
            list_ttl: env.duration_or("CACHE_LIST_TTL", Self::DEFAULT_LIST_TTL),
            redis_timeout: env.duration_or("CACHE_REDIS_TIMEOUT", Self::DEFAULT_REDIS_TIMEOUT),
            breaker_cooldown: env
                .duration_or("CACHE_BREAKER_COOLDOWN", Self::DEFAULT_BREAKER_COOLDOWN),
        };
        for (name, value) in [
            ("CACHE_DETAIL_TTL", config.detail_ttl),
            ("CACHE_LIST_TTL", config.list_ttl),
            ("CACHE_REDIS_TIMEOUT", config.redis_timeout),
        ] {
            if value < Duration::from_millis(1) {
                env.problem(&env.name(name), "must be at least 1ms".to_owned());
            }
        }
        if config.detail_ttl.max(config.list_ttl) >= VERSION_TTL {
            env.problem(
                &env.name("CACHE_DETAIL_TTL"),
                "cache TTLs must stay under 24h (the life of a user's cache version)".to_owned(),
            );
        }
        config
    }
}

/// The two kinds of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Detail,
    List,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Detail => "detail",
            Self::List => "list",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Detail => "d",
            Self::List => "l",
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<V> {
    Hit(V),
    /// Not cached: load it, then [`NotesCache::fill`] with this.
    Miss(Fill),
    /// Redis is not usable now: load from Postgres and do not fill.
    Bypass,
}

/// Where a loaded value goes: the key under the version read before the load.
#[derive(Debug)]
pub struct Fill {
    key: String,
    kind: Kind,
}

/// The notes cache; cheap to clone.
#[derive(Debug, Clone)]
pub struct NotesCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: RedisPool,
    redis_config: RedisConfig,
    config: CacheConfig,
    started: Instant,
    /// The breaker: 0 when closed, else milliseconds since `started` before which Redis is
    /// skipped (a failure's cool-down, or the time a probe has to answer).
    skip_until_ms: AtomicU64,
    pending: Mutex<Pending>,
    read: redis::Script,
    bump: redis::Script,
}

#[derive(Debug, Default)]
struct Pending {
    users: HashSet<Uuid>,
    /// Too many to remember: stop reading entries for a TTL once Redis is back.
    overflowed: bool,
    /// Milliseconds since `started` before which entries are not read (after an overflow).
    distrust_until_ms: u64,
}

/// The user's version (created from the clock if missing) and the entry under it, in one
/// round trip. KEYS[1] version key; ARGV[1] entry key up to the version, ARGV[2] the rest,
/// ARGV[3] version TTL in seconds.
const READ_SCRIPT: &str = r"
local version = redis.call('GET', KEYS[1])
if not version then
  local now = redis.call('TIME')
  version = now[1] .. string.format('%06d', tonumber(now[2]))
  if not redis.call('SET', KEYS[1], version, 'NX', 'EX', ARGV[3]) then
    version = redis.call('GET', KEYS[1]) or version
  end
end
return {version, redis.call('GET', ARGV[1] .. version .. ARGV[2])}
";

/// Moves the user's version past every number it had: max(version + 1, clock in µs).
/// KEYS[1] version key; ARGV[1] version TTL in seconds. (Doubles hold these integers
/// exactly: they stay far below 2^53.)
const BUMP_SCRIPT: &str = r"
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local next = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
if clock > next then next = clock end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'EX', ARGV[1])
return 1
";

impl NotesCache {
    pub fn new(redis: RedisPool, redis_config: RedisConfig, config: CacheConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                redis_config,
                config,
                started: Instant::now(),
                skip_until_ms: AtomicU64::new(0),
                pending: Mutex::new(Pending::default()),
                read: redis::Script::new(READ_SCRIPT),
                bump: redis::Script::new(BUMP_SCRIPT),
            }),
        }
    }

    /// The cached detail of one of `user`'s notes.
    pub async fn detail<V: Message + Default>(&self, user: Uuid, note: Uuid) -> Lookup<V> {
        self.lookup(user, Kind::Detail, &note.simple().to_string())
            .await
    }

    /// A cached list page of `user`; `request` identifies the page (filters, size, cursor).
    pub async fn list<V: Message + Default>(&self, user: Uuid, request: &[u8]) -> Lookup<V> {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(request);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.lookup(user, Kind::List, &hex).await
    }

    async fn lookup<V: Message + Default>(&self, user: Uuid, kind: Kind, id: &str) -> Lookup<V> {
        let inner = &self.inner;
        let result = if !inner.usable() || !inner.entries_trusted() || !self.flush_pending().await {
            Lookup::Bypass
        } else {
            let version_key = inner.version_key(user);
            let head = inner.redis_config.key(&format!("{SCHEMA}:{{{user}}}:"));
            let tail = format!(":{}:{id}", kind.tag());
            let mut invocation = inner.read.key(&version_key);
            invocation.arg(&head).arg(&tail).arg(VERSION_TTL.as_secs());
            let call = async {
                let mut conn = inner.redis.get().await.map_err(|e| e.to_string())?;
                invocation
                    .invoke_async::<(String, Option<Vec<u8>>)>(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            match inner.bounded(call).await {
                None => Lookup::Bypass,
                Some((version, Some(bytes))) => match V::decode(bytes.as_slice()) {
                    Ok(value) => Lookup::Hit(value),
                    Err(error) => {
                        // Written by another shape under the same schema tag: a bug; reload.
                        tracing::warn!(%error, cache = kind.label(), "undecodable cache entry");
                        Lookup::Miss(Fill {
                            key: format!("{head}{version}{tail}"),
                            kind,
                        })
                    }
                },
                Some((version, None)) => Lookup::Miss(Fill {
                    key: format!("{head}{version}{tail}"),
                    kind,
                }),
            }
        };
        let label = match &result {
            Lookup::Hit(_) => "hit",
            Lookup::Miss(_) => "miss",
            Lookup::Bypass => "bypass",
        };
        metrics::counter!("notes_cache_lookups_total", "cache" => kind.label(), "result" => label)
            .increment(1);
        result
    }

    /// Stores a loaded value where the lookup said (values above [`MAX_VALUE_BYTES`] are not).
    pub async fn fill<V: Message>(&self, fill: Fill, value: &V) {
        let inner = &self.inner;
        let bytes = value.encode_to_vec();
        if bytes.len() > MAX_VALUE_BYTES || !inner.usable() {
            return;
        }
        let ttl = match fill.kind {
            Kind::Detail => inner.config.detail_ttl,
            Kind::List => inner.config.list_ttl,
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let call = async {
            let mut conn = inner.redis.get().await.map_err(|e| e.to_string())?;
            redis::cmd("SET")
                .arg(&fill.key)
                .arg(bytes)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut *conn)
                .await
                .map_err(|e| e.to_string())
        };
        inner.bounded(call).await;
    }

    /// Orphans every cached detail and list page of `user` (call after the write commits,
    /// before it returns). When Redis cannot be reached the bump is kept for later.
    pub async fn invalidate(&self, user: Uuid) {
        if !(self.inner.usable() && self.flush_pending().await && self.bump(user).await) {
            self.inner.remember(user);
        }
    }

    /// Moves `user`'s version on (the caller checked the breaker).
    async fn bump(&self, user: Uuid) -> bool {
        let inner = &self.inner;
        let version_key = inner.version_key(user);
        let mut invocation = inner.bump.key(&version_key);
        invocation.arg(VERSION_TTL.as_secs());
        let call = async {
            let mut conn = inner.redis.get().await.map_err(|e| e.to_string())?;
            invocation
                .invoke_async::<i64>(&mut *conn)
                .await
                .map_err(|e| e.to_string())
        };
        inner.bounded(call).await.is_some()
    }

    /// Replays bumps that could not reach Redis; `true` once none is pending (until then
    /// the cache must not be read). The caller checked the breaker.
    async fn flush_pending(&self) -> bool {
        let (users, overflowed) = {
            let pending = self.inner.lock_pending();
            if pending.users.is_empty() && !pending.overflowed {
                return true;
            }
            (
                pending.users.iter().copied().collect::<Vec<_>>(),
                pending.overflowed,
            )
        };
        for user in &users {
            if !self.bump(*user).await {
                return false;
            }
        }
        let mut pending = self.inner.lock_pending();
        for user in &users {
            pending.users.remove(user);
        }
        if overflowed {
            // Which users' entries are stale is not known: read none until all have expired.
            let ttl = self.inner.config.detail_ttl.max(self.inner.config.list_ttl);
            pending.overflowed = false;
            pending.distrust_until_ms =
                self.inner.now_ms() + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
            tracing::warn!(
                ?ttl,
                "cache bumps were lost while Redis was down: reading no entries until they expire"
            );
        } else {
            tracing::info!(
                users = users.len(),
                "cache bumps replayed after Redis came back"
            );
        }
        pending.users.is_empty() && !pending.overflowed
    }
}

impl Inner {
    fn version_key(&self, user: Uuid) -> String {
        // The braces are a hash tag: a user's keys share one cluster slot, as the read script
        // touches the version and an entry together.
        self.redis_config.key(&format!("{SCHEMA}:{{{user}}}:v"))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }

    /// False for a while after bumps were lost (see [`PENDING_MAX`]).
    fn entries_trusted(&self) -> bool {
        self.lock_pending().distrust_until_ms <= self.now_ms()
    }

    /// Whether Redis may be called now: always while the breaker is closed; after a failure,
    /// not until the cool-down is over, and then by one caller at a time (the probe) until a
    /// call succeeds.
    fn usable(&self) -> bool {
        let until = self.skip_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        if now < until {
            return false;
        }
        let probe_ms = u64::try_from(self.config.redis_timeout.as_millis()).unwrap_or(u64::MAX / 4);
        self.skip_until_ms
            .compare_exchange(until, now + probe_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, user: Uuid) {
        let mut pending = self.lock_pending();
        if pending.users.len() < PENDING_MAX {
            pending.users.insert(user);
        } else {
            pending.overflowed = true;
        }
    }

    /// Runs one Redis call within the timeout; on failure opens the breaker.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, String>>,
    ) -> Option<T> {
        let error = match tokio::time::timeout(self.config.redis_timeout, call).await {
            Ok(Ok(value)) => {
                if self.skip_until_ms.load(Ordering::Relaxed) != 0 {
                    self.skip_until_ms.store(0, Ordering::Relaxed);
                    tracing::info!("redis answers the notes cache again");
                }
                return Some(value);
            }
            Ok(Err(error)) => error,
            Err(_) => "timed out".to_owned(),
        };
        // At least 1 ms: 0 means closed.
        let cooldown = u64::try_from(self.config.breaker_cooldown.as_millis())
            .unwrap_or(u64::MAX / 4)
            .max(1);
        self.skip_until_ms
            .store(self.now_ms() + cooldown, Ordering::Relaxed);
        metrics::counter!("notes_cache_redis_failures_total").increment(1);
        tracing::warn!(%error, cooldown_ms = cooldown, "redis unavailable for the notes cache: serving from Postgres");
        None
    }
}
