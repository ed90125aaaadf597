//! The two-level cache: an in-process level (L1, moka: bounded by entries and value size,
//! short TTL) in front of Redis (L2, the service's pool and key prefix, longer TTL), with
//! single-flight loads, invalidation that reaches every replica, and plain loading from the
//! source when Redis is down.
//!
//! # Correctness
//!
//! - **Writes invalidate, they never write values.** After its database commit a writer calls
//!   [`TwoLevelCache::invalidate`]: it evicts its own L1 entry, then in one atomic Redis
//!   transaction bumps the key's invalidation counter, deletes the L2 value and publishes the
//!   key on the invalidation channel, which every replica's listener turns into an L1 eviction.
//! - **A load never stores a value older than an invalidation.** A miss reads the L2 value,
//!   the key's counter and the cache's generation in one `MGET`, *then* loads from the source;
//!   the fill is a script that stores only if the counter is unchanged. A write that commits
//!   after the load's snapshot bumps the counter after the `MGET`, so the stale fill is
//!   refused. In-process, per-key stripes of counters play the same role for L1.
//! - **Shared data changed (a plan renamed):** [`TwoLevelCache::invalidate_all`] bumps the
//!   cache's generation (every L2 value carries the generation it was stored under, so all
//!   become misses at once) and publishes a flush that clears L1 on every replica.
//! - **Staleness bound.** With Redis up, a replica's L1 hears an invalidation within the
//!   pub/sub delivery time (sub-millisecond on one network). If its subscription is lost, L1
//!   entries live at most the L1 TTL, and L1 is cleared when the subscription is back. An
//!   invalidation that cannot reach Redis (Redis down) is kept and replayed when Redis answers
//!   again (past [`PENDING_INVALIDATIONS_MAX`] the whole generation is bumped instead); only
//!   if the process dies before that can an L2 value outlive its data, by at most the L2 TTL.
//! - **Redis down.** Every Redis call is bounded by a timeout and guarded by a breaker: after
//!   a failure, Redis is skipped for the cool-down (no timeout per request), then one call
//!   probes it. Loads go to the source meanwhile; caching resumes by itself.

use std::{
    collections::{HashSet, hash_map::DefaultHasher},
    future::Future,
    hash::{Hash as _, Hasher as _},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use prost::Message;
use tracing::Instrument as _;

use crate::{
    config::Env,
    redis_pool::{RedisConfig, RedisPool},
};

/// Past this many invalidations waiting for Redis, a replica gives up on remembering keys
/// and bumps every generation it knows of when Redis is back.
pub const PENDING_INVALIDATIONS_MAX: usize = 10_000;

/// Stripes of in-process invalidation counters (per-key counters hashed into these).
const STRIPES: usize = 64;

/// Settings shared by every cache of a service (`<PREFIX>_CACHE_*`).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `<PREFIX>_CACHE_REDIS_TIMEOUT` (default 100ms): bound on each Redis call the cache
    /// makes; past it the call counts as a failure and the breaker opens.
    pub redis_timeout: Duration,
    /// `<PREFIX>_CACHE_BREAKER_COOLDOWN` (default 5s): how long Redis is skipped after a
    /// failure before one call probes it again.
    pub breaker_cooldown: Duration,
}

impl CacheSettings {
    pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
    pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);

    pub fn from_env(env: &Env) -> Self {
        let settings = Self {
            redis_timeout: env.duration_or("CACHE_REDIS_TIMEOUT", Self::DEFAULT_REDIS_TIMEOUT),
            breaker_cooldown: env
                .duration_or("CACHE_BREAKER_COOLDOWN", Self::DEFAULT_BREAKER_COOLDOWN),
        };
        if settings.redis_timeout.is_zero() {
            env.problem(
                &env.name("CACHE_REDIS_TIMEOUT"),
                "must be above 0".to_owned(),
            );
        }
        settings
    }
}

/// What distinguishes one cache from another.
#[derive(Debug, Clone)]
pub struct CacheSpec {
    /// The `cache` metric label and part of every key, e.g. `profile`.
    pub name: &'static str,
    /// Part of every key: bump it when the encoded shape changes, so a deploy never decodes
    /// values written by the previous version.
    pub schema_version: u32,
    pub l1_ttl: Duration,
    pub l1_max_entries: u64,
    /// Values encoding to more bytes are not kept in L1, so L1 memory stays under
    /// `l1_max_entries × l1_max_value_bytes`.
    pub l1_max_value_bytes: usize,
    pub l2_ttl: Duration,
}

/// Why a load produced no value: nothing to cache, or a failure to pass on.
#[derive(Debug, Clone)]
pub enum Miss<E> {
    /// The source has no value for the key (not cached).
    Absent,
    Failed(E),
}

/// Machinery every cache of a service shares: Redis, the breaker, the invalidation channel
/// and its listener.
#[derive(Debug, Clone)]
pub struct CacheBus {
    inner: Arc<BusInner>,
}

#[derive(Debug)]
struct BusInner {
    redis: RedisPool,
    redis_config: RedisConfig,
    settings: CacheSettings,
    breaker: Breaker,
    channel: String,
    /// The L1 side of every cache, by name, for the listener.
    caches: RwLock<Vec<Arc<dyn LocalLevel>>>,
    /// Invalidations that could not reach Redis, replayed when it answers again.
    pending: Mutex<Pending>,
    subscribed: AtomicBool,
    /// A seqlock over recoveries: odd while pending invalidations are being replayed. An L2
    /// read that overlaps a replay may have read a value the replay deletes, so it is not
    /// trusted.
    recovery: AtomicU64,
    fill_script: redis::Script,
}

#[derive(Debug, Default)]
struct Pending {
    keys: HashSet<(&'static str, String)>,
    /// Too many to remember: bump the generation of every cache instead.
    overflowed: bool,
}

/// What the listener needs of a cache, whatever its value type.
trait LocalLevel: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn evict<'a>(&'a self, key: &'a str) -> futures::future::BoxFuture<'a, ()>;
    fn clear(&self);
    /// The Redis keys this cache uses for `key`, for replays.
    fn keys(&self, key: &str) -> L2Keys;
    fn gen_key(&self) -> String;
}

impl CacheBus {
    /// The bus over the service's Redis pool; the invalidation listener runs until the
    /// process ends (it holds one connection of its own, outside the pool).
    pub fn start(redis: RedisPool, redis_config: &RedisConfig, settings: CacheSettings) -> Self {
        let bus = Self {
            inner: Arc::new(BusInner {
                redis,
                channel: redis_config.key("cache-invalidations"),
                redis_config: redis_config.clone(),
                breaker: Breaker::new(settings.breaker_cooldown),
                settings,
                caches: RwLock::new(Vec::new()),
                pending: Mutex::new(Pending::default()),
                subscribed: AtomicBool::new(false),
                recovery: AtomicU64::new(0),
                fill_script: redis::Script::new(FILL_SCRIPT),
            }),
        };
        describe_metrics();
        tokio::spawn(listen(Arc::downgrade(&bus.inner)));
        bus
    }

    /// A cache of `V` values under this bus.
    pub fn cache<V>(&self, spec: CacheSpec) -> TwoLevelCache<V>
    where
        V: Message + Default + Send + Sync + 'static,
    {
        let l1 = moka::future::Cache::builder()
            .max_capacity(spec.l1_max_entries)
            .time_to_live(spec.l1_ttl)
            .build();
        let local = Arc::new(Local {
            l1,
            prefix: self
                .inner
                .redis_config
                .key(&format!("{}:v{}:", spec.name, spec.schema_version)),
            spec,
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
            flushes: AtomicU64::new(0),
        });
        if let Ok(mut caches) = self.inner.caches.write() {
            caches.push(local.clone());
        }
        TwoLevelCache {
            local,
            bus: self.clone(),
        }
    }

    /// Whether Redis answered the last call (the breaker is closed).
    pub fn redis_available(&self) -> bool {
        self.inner.breaker.is_closed()
    }

    /// Whether this replica is hearing invalidations from the others right now.
    pub fn subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Relaxed)
    }

    /// Runs one Redis call through the breaker and the timeout; `None` when Redis is skipped
    /// or fails (logged, counted, and the breaker opened). The call that finds Redis back
    /// first replays the invalidations it missed.
    async fn redis<T, F, Fut>(&self, what: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.inner.breaker.allow() {
            return None;
        }
        let value = self.call(what, call).await?;
        if self.inner.breaker.succeeded() {
            tracing::info!("redis answers again: caching resumes");
            self.recover().await;
        }
        Some(value)
    }

    /// One Redis call bounded by the timeout, failures recorded (the breaker opens), without
    /// the breaker's permission: for [`CacheBus::redis`] and replays.
    async fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let span = tracing::debug_span!("redis", otel.name = what, db.system = "redis");
        let result = tokio::time::timeout(inner.settings.redis_timeout, async {
            let connection = inner
                .redis
                .get_owned()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            call(connection).await.map_err(|e| e.to_string())
        })
        .instrument(span)
        .await;
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.failed(what, &error);
                None
            }
            Err(_) => {
                self.failed(what, "timed out");
                None
            }
        }
    }

    fn failed(&self, what: &'static str, error: &str) {
        if self.inner.breaker.failed() {
            tracing::warn!(
                call = what,
                error,
                cooldown = ?self.inner.settings.breaker_cooldown,
                "redis failed: skipping the cache level for the cool-down"
            );
        } else {
            tracing::debug!(call = what, error, "redis call failed");
        }
        metrics::counter!("cache_redis_errors_total", "call" => what).increment(1);
    }

    fn remember(&self, cache: &'static str, key: Option<&str>) {
        if let Ok(mut pending) = self.inner.pending.lock() {
            match key {
                Some(key) if pending.keys.len() < PENDING_INVALIDATIONS_MAX => {
                    pending.keys.insert((cache, key.to_owned()));
                }
                _ => pending.overflowed = true,
            }
        }
    }

    /// Sends the invalidations that failed while Redis was down, before anything read from
    /// Redis since it came back is trusted (see `recovery`).
    async fn recover(&self) {
        let taken = match self.inner.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        if taken.keys.is_empty() && !taken.overflowed {
            return;
        }
        self.inner.recovery.fetch_add(1, Ordering::AcqRel);
        let caches = self.locals();
        if taken.overflowed {
            tracing::info!("too many invalidations missed: dropping every cached generation");
            for cache in &caches {
                let call = generation_bump(&self.inner.channel, cache.name(), cache.gen_key());
                if self.call("cache.invalidate_all", call).await.is_none() {
                    self.remember(cache.name(), None);
                }
            }
        } else {
            tracing::info!(
                count = taken.keys.len(),
                "replaying invalidations Redis missed"
            );
            for (name, key) in taken.keys {
                if let Some(cache) = caches.iter().find(|c| c.name() == name) {
                    let call = invalidation(&self.inner.channel, name, &key, cache.keys(&key));
                    if self.call("cache.invalidate", call).await.is_none() {
                        self.remember(name, Some(&key));
                    }
                }
            }
        }
        self.inner.recovery.fetch_add(1, Ordering::AcqRel);
    }

    /// A token for [`CacheBus::trusted_since`]: taken before an L2 read.
    fn recovery_token(&self) -> u64 {
        self.inner.recovery.load(Ordering::Acquire)
    }

    /// Whether an L2 read that started at `token` overlapped no replay of missed
    /// invalidations.
    fn trusted_since(&self, token: u64) -> bool {
        token.is_multiple_of(2) && self.recovery_token() == token
    }

    fn locals(&self) -> Vec<Arc<dyn LocalLevel>> {
        self.inner
            .caches
            .read()
            .map(|caches| caches.clone())
            .unwrap_or_default()
    }

    /// Bumps the key's counter, deletes its value and tells every replica, atomically; kept
    /// for a replay when Redis cannot be reached.
    async fn invalidate_remote(&self, cache: &'static str, key: &str, keys: L2Keys) {
        let call = invalidation(&self.inner.channel, cache, key, keys);
        if self.redis("cache.invalidate", call).await.is_none() {
            self.remember(cache, Some(key));
        }
    }

    async fn bump_generation(&self, cache: &'static str, gen_key: String) {
        let call = generation_bump(&self.inner.channel, cache, gen_key);
        if self.redis("cache.invalidate_all", call).await.is_none() {
            self.remember(cache, None);
        }
    }

    async fn dispatch(&self, payload: &str) {
        let (kind, rest) = payload.split_at(payload.len().min(1));
        let (name, key) = rest.split_once('|').unwrap_or((rest, ""));
        for cache in self.locals().iter().filter(|c| c.name() == name) {
            match kind {
                "k" => cache.evict(key).await,
                "a" => cache.clear(),
                _ => {}
            }
            metrics::counter!("cache_invalidations_total", "cache" => cache.name(), "source" => "remote")
                .increment(1);
        }
    }

    fn clear_all_local(&self) {
        for cache in self.locals() {
            cache.clear();
        }
    }
}

type Connection = bb8::PooledConnection<'static, crate::redis_pool::RedisManager>;

/// The atomic invalidation of one key: bump its counter, delete its value, tell everyone.
fn invalidation(
    channel: &str,
    cache: &'static str,
    key: &str,
    keys: L2Keys,
) -> impl FnOnce(Connection) -> futures::future::BoxFuture<'static, redis::RedisResult<()>> {
    let message = format!("k{cache}|{key}");
    let channel = channel.to_owned();
    move |mut conn| {
        Box::pin(async move {
            redis::pipe()
                .atomic()
                .incr(&keys.inv, 1)
                .ignore()
                .pexpire(&keys.inv, keys.inv_ttl_ms)
                .ignore()
                .del(&keys.value)
                .ignore()
                .publish(&channel, message)
                .ignore()
                .query_async::<()>(&mut *conn)
                .await
        })
    }
}

/// The atomic invalidation of a whole cache: bump its generation, tell everyone.
fn generation_bump(
    channel: &str,
    cache: &'static str,
    gen_key: String,
) -> impl FnOnce(Connection) -> futures::future::BoxFuture<'static, redis::RedisResult<()>> {
    let message = format!("a{cache}|");
    let channel = channel.to_owned();
    move |mut conn| {
        Box::pin(async move {
            redis::pipe()
                .atomic()
                .incr(&gen_key, 1)
                .ignore()
                .publish(&channel, message)
                .ignore()
                .query_async::<()>(&mut *conn)
                .await
        })
    }
}

/// Stores `ARGV[3]` at `KEYS[1]` for `ARGV[4]` ms only if the key's invalidation counter
/// (`KEYS[2]`) and the cache's generation (`KEYS[3]`) are what the reader saw (`ARGV[1]`,
/// `ARGV[2]`) before it loaded: a write that committed after the load's snapshot has bumped
/// one of them.
const FILL_SCRIPT: &str = r"
if (redis.call('GET', KEYS[2]) or '') == ARGV[1] and (redis.call('GET', KEYS[3]) or '0') == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
";

/// Listens on the invalidation channel and evicts L1 entries as told; clears L1 whenever it
/// (re)subscribes, since messages may have been missed meanwhile.
async fn listen(bus: std::sync::Weak<BusInner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = bus.upgrade() else { return };
        let handle = CacheBus {
            inner: inner.clone(),
        };
        let client = match redis::Client::open(inner.redis_config.url.expose()) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "invalid redis URL: no cross-replica invalidation");
                return;
            }
        };
        let channel = inner.channel.clone();
        drop(inner);
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                // Whatever was published while we were away is lost: start clean.
                handle.clear_all_local();
                handle.inner.subscribed.store(true, Ordering::Relaxed);
                // Redis is back for us: send what it missed before the next read trusts it.
                handle.recover().await;
                metrics::gauge!("cache_invalidation_subscribed").set(1.0);
                tracing::info!("listening for cache invalidations");
                let (mut sink, mut stream) = pubsub.split();
                let mut ping = tokio::time::interval(Duration::from_secs(5));
                ping.tick().await;
                loop {
                    tokio::select! {
                        message = stream.next() => match message {
                            Some(message) => {
                                if let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) {
                                    handle.dispatch(payload).await;
                                }
                            }
                            None => break,
                        },
                        _ = ping.tick() => {
                            // A silently dead connection (no RST) shows only when asked.
                            let answered = tokio::time::timeout(Duration::from_secs(2), sink.ping::<String>()).await;
                            if !matches!(answered, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                handle.inner.subscribed.store(false, Ordering::Relaxed);
                metrics::gauge!("cache_invalidation_subscribed").set(0.0);
                tracing::warn!(
                    "cache invalidation subscription lost; L1 TTL bounds staleness until it is back"
                );
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to cache invalidations"),
            Err(_) => tracing::debug!("subscribing to cache invalidations timed out"),
        }
        drop(handle);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Redis key names of one cache entry.
#[derive(Debug, Clone)]
struct L2Keys {
    value: String,
    inv: String,
    gen_key: String,
    inv_ttl_ms: i64,
}

/// The in-process level of one cache, plus what names its keys.
struct Local<V> {
    spec: CacheSpec,
    l1: moka::future::Cache<String, Arc<V>>,
    /// `<service prefix><name>:v<schema>:`
    prefix: String,
    stripes: [AtomicU64; STRIPES],
    flushes: AtomicU64,
}

impl<V> std::fmt::Debug for Local<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("spec", &self.spec)
            .field("prefix", &self.prefix)
            .field("entries", &self.l1.entry_count())
            .finish_non_exhaustive()
    }
}

impl<V> Local<V> {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        &self.stripes[index]
    }

    /// A token that changes whenever `key` (or everything) is invalidated in this process.
    fn version(&self, key: &str) -> (u64, u64) {
        (
            self.flushes.load(Ordering::Acquire),
            self.stripe(key).load(Ordering::Acquire),
        )
    }
}

impl<V: Message + 'static> LocalLevel for Local<V> {
    fn name(&self) -> &'static str {
        self.spec.name
    }

    fn evict<'a>(&'a self, key: &'a str) -> futures::future::BoxFuture<'a, ()> {
        // The stripe first: a load in flight for this key sees it and drops what it stores.
        self.stripe(key).fetch_add(1, Ordering::AcqRel);
        Box::pin(self.l1.invalidate(key))
    }

    fn clear(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.l1.invalidate_all();
    }

    fn keys(&self, key: &str) -> L2Keys {
        let ttl_ms = i64::try_from(self.spec.l2_ttl.as_millis()).unwrap_or(i64::MAX);
        L2Keys {
            value: format!("{}{key}", self.prefix),
            inv: format!("{}inv:{key}", self.prefix),
            gen_key: self.gen_key(),
            // Outlives every value it guards, plus a minute for fills still in flight.
            inv_ttl_ms: ttl_ms.saturating_add(60_000),
        }
    }

    fn gen_key(&self) -> String {
        format!("{}gen", self.prefix)
    }
}

/// One cache of `V` values (protobuf-encoded in Redis) with both levels.
pub struct TwoLevelCache<V> {
    local: Arc<Local<V>>,
    bus: CacheBus,
}

impl<V> std::fmt::Debug for TwoLevelCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoLevelCache")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<V> Clone for TwoLevelCache<V> {
    fn clone(&self) -> Self {
        Self {
            local: self.local.clone(),
            bus: self.bus.clone(),
        }
    }
}

impl<V> TwoLevelCache<V>
where
    V: Message + Default + Send + Sync + 'static,
{
    pub fn name(&self) -> &'static str {
        self.local.spec.name
    }

    /// The value for `key`: from L1, else L2, else `load` (once per key at a time in this
    /// process: concurrent misses wait for the same load). Values are stored in both levels;
    /// [`Miss::Absent`] and failures are not cached.
    pub async fn get_or_load<E, F, Fut>(&self, key: &str, load: F) -> Result<Arc<V>, Miss<E>>
    where
        E: Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let name = self.name();
        if let Some(value) = self.local.l1.get(key).await {
            metrics::counter!("cache_requests_total", "cache" => name, "level" => "l1", "result" => "hit").increment(1);
            return Ok(value);
        }
        let seen = self.local.version(key);
        let span = tracing::debug_span!("cache.load", cache = name, level = tracing::field::Empty);
        let result = self
            .local
            .l1
            .try_get_with_by_ref(key, self.miss(key, load).instrument(span))
            .await;
        match result {
            Ok(value) => {
                if self.local.version(key) != seen {
                    // Invalidated while loading: the value served this one read, but must
                    // not stay behind.
                    self.local.l1.invalidate(key).await;
                }
                Ok(value)
            }
            Err(miss) => Err((*miss).clone()),
        }
    }

    /// What runs on an L1 miss (single-flight: one per key at a time).
    async fn miss<E, F, Fut>(&self, key: &str, load: F) -> Result<Arc<V>, Miss<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let name = self.name();
        metrics::counter!("cache_requests_total", "cache" => name, "level" => "l1", "result" => "miss").increment(1);
        let keys = self.local.keys(key);
        let read_keys = keys.clone();
        let recovery = self.bus.recovery_token();
        let l2 = self
            .bus
            .redis("cache.get", move |mut conn| async move {
                redis::cmd("MGET")
                    .arg(&read_keys.value)
                    .arg(&read_keys.inv)
                    .arg(&read_keys.gen_key)
                    .query_async::<(Option<Vec<u8>>, Option<String>, Option<String>)>(&mut *conn)
                    .await
            })
            .await
            .filter(|_| self.bus.trusted_since(recovery));
        let (seen_inv, seen_gen) = match &l2 {
            Some((blob, inv, generation)) => {
                let generation = generation.clone().unwrap_or_else(|| "0".to_owned());
                if let Some(value) = blob.as_deref().and_then(|b| decode::<V>(b, &generation)) {
                    metrics::counter!("cache_requests_total", "cache" => name, "level" => "l2", "result" => "hit").increment(1);
                    tracing::Span::current().record("level", "l2");
                    return Ok(Arc::new(value));
                }
                metrics::counter!("cache_requests_total", "cache" => name, "level" => "l2", "result" => "miss").increment(1);
                (Some(inv.clone().unwrap_or_default()), Some(generation))
            }
            None => {
                metrics::counter!("cache_requests_total", "cache" => name, "level" => "l2", "result" => "skipped").increment(1);
                (None, None)
            }
        };
        tracing::Span::current().record("level", "source");

        let started = Instant::now();
        let loaded = load().await;
        metrics::histogram!("cache_load_duration_seconds", "cache" => name)
            .record(started.elapsed().as_secs_f64());
        let value = match loaded {
            Ok(Some(value)) => value,
            Ok(None) => {
                metrics::counter!("cache_loads_total", "cache" => name, "result" => "absent")
                    .increment(1);
                return Err(Miss::Absent);
            }
            Err(e) => {
                metrics::counter!("cache_loads_total", "cache" => name, "result" => "error")
                    .increment(1);
                return Err(Miss::Failed(e));
            }
        };
        metrics::counter!("cache_loads_total", "cache" => name, "result" => "loaded").increment(1);

        if let (Some(inv), Some(generation)) = (seen_inv, seen_gen) {
            let blob = encode(&value, &generation);
            let script = self.bus.inner.fill_script.clone();
            let ttl = i64::try_from(self.local.spec.l2_ttl.as_millis()).unwrap_or(i64::MAX);
            self.bus
                .redis("cache.fill", move |mut conn| async move {
                    script
                        .key(&keys.value)
                        .key(&keys.inv)
                        .key(&keys.gen_key)
                        .arg(inv)
                        .arg(generation)
                        .arg(blob)
                        .arg(ttl)
                        .invoke_async::<i64>(&mut *conn)
                        .await
                })
                .await;
        }
        let value = Arc::new(value);
        if value.encoded_len() > self.local.spec.l1_max_value_bytes {
            // Too big for L1's memory bound: served, not kept (moka stores what we return,
            // so it is evicted right after; see `get_or_load`).
            self.local.stripe(key).fetch_add(1, Ordering::AcqRel);
        }
        Ok(value)
    }

    /// Drops `key` from both levels on every replica. Call after the write committed.
    pub async fn invalidate(&self, key: &str) {
        metrics::counter!("cache_invalidations_total", "cache" => self.name(), "source" => "local")
            .increment(1);
        self.local.evict(key).await;
        self.bus
            .invalidate_remote(self.name(), key, self.local.keys(key))
            .await;
    }

    /// Drops every entry of this cache from both levels on every replica (shared data that
    /// many entries embed has changed).
    pub async fn invalidate_all(&self) {
        metrics::counter!("cache_invalidations_total", "cache" => self.name(), "source" => "local")
            .increment(1);
        self.local.clear();
        self.bus
            .bump_generation(self.name(), self.local.gen_key())
            .await;
    }

    /// Drops `key` from this replica's L1 only, for events every replica hears itself (a
    /// change stream): the L2 copy is dropped by [`TwoLevelCache::invalidate`] elsewhere or
    /// expires with its TTL.
    pub async fn evict_local(&self, key: &str) {
        self.local.evict(key).await;
    }

    /// Clears this replica's L1 only.
    pub fn clear_local(&self) {
        self.local.clear();
    }

    /// Entries in L1 right now (approximate, as moka counts).
    pub fn l1_entries(&self) -> u64 {
        self.local.l1.entry_count()
    }
}

/// L2 values: `<generation>:<protobuf bytes>`.
fn encode<V: Message>(value: &V, generation: &str) -> Vec<u8> {
    let mut blob = Vec::with_capacity(generation.len() + 1 + value.encoded_len());
    blob.extend_from_slice(generation.as_bytes());
    blob.push(b':');
    value.encode_raw(&mut blob);
    blob
}

/// The value of a blob stored under `generation`; `None` for another generation or bytes
/// that do not decode (treated as a miss, and overwritten by the next fill).
fn decode<V: Message + Default>(blob: &[u8], generation: &str) -> Option<V> {
    let split = blob.iter().position(|b| *b == b':')?;
    let (stored, rest) = blob.split_at(split);
    if stored != generation.as_bytes() {
        return None;
    }
    V::decode(&rest[1..]).ok()
}

/// A circuit breaker over Redis: closed (calls go through), open after a failure (calls are
/// skipped until the cool-down passes), then one probe at a time until a call succeeds.
#[derive(Debug)]
struct Breaker {
    state: AtomicU8,
    opened_at: Mutex<Instant>,
    cooldown: Duration,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const PROBING: u8 = 2;

impl Breaker {
    fn new(cooldown: Duration) -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            opened_at: Mutex::new(Instant::now()),
            cooldown,
        }
    }

    fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// Whether a call may go to Redis now.
    fn allow(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => {
                let cooled = self
                    .opened_at
                    .lock()
                    .map(|at| at.elapsed() >= self.cooldown)
                    .unwrap_or(true);
                // One caller wins the probe; the others keep skipping.
                cooled
                    && self
                        .state
                        .compare_exchange(OPEN, PROBING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            }
            _ => false,
        }
    }

    /// Records a success; `true` when this closed the breaker.
    fn succeeded(&self) -> bool {
        let was = self.state.swap(CLOSED, Ordering::AcqRel);
        if was != CLOSED {
            metrics::gauge!("cache_redis_available").set(1.0);
        }
        was != CLOSED
    }

    /// Records a failure; `true` when this opened the breaker.
    fn failed(&self) -> bool {
        if let Ok(mut at) = self.opened_at.lock() {
            *at = Instant::now();
        }
        let was = self.state.swap(OPEN, Ordering::AcqRel);
        metrics::gauge!("cache_redis_available").set(0.0);
        was == CLOSED
    }
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "cache_requests_total",
        Unit::Count,
        "Cache lookups, by cache, level (l1, l2) and result (hit, miss; skipped when Redis is bypassed)"
    );
    describe_counter!(
        "cache_loads_total",
        Unit::Count,
        "Loads from the source after both levels missed, by cache and result (loaded, absent, error)"
    );
    describe_histogram!(
        "cache_load_duration_seconds",
        Unit::Seconds,
        "Time to load a value from the source on a miss"
    );
    describe_counter!(
        "cache_invalidations_total",
        Unit::Count,
        "Invalidations, by cache and source (local: this replica's writes; remote: heard from the channel)"
    );
    describe_counter!(
        "cache_redis_errors_total",
        Unit::Count,
        "Redis calls of the cache that failed or timed out, by call"
    );
    describe_gauge!(
        "cache_redis_available",
        Unit::Count,
        "1 while the cache's Redis breaker is closed, 0 while Redis is skipped"
    );
    describe_gauge!(
        "cache_invalidation_subscribed",
        Unit::Count,
        "1 while this replica hears other replicas' invalidations, 0 while L1 relies on its TTL"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_blobs_carry_their_generation() {
        let value = prost_types::Timestamp {
            seconds: 42,
            nanos: 7,
        };
        let blob = encode(&value, "3");
        assert_eq!(decode::<prost_types::Timestamp>(&blob, "3"), Some(value));
        assert_eq!(decode::<prost_types::Timestamp>(&blob, "4"), None);
        assert_eq!(decode::<prost_types::Timestamp>(b"garbage", "3"), None);
    }

    #[test]
    fn the_breaker_skips_redis_for_the_cooldown_then_lets_one_probe() {
        let breaker = Breaker::new(Duration::from_millis(30));
        assert!(breaker.allow());
        assert!(breaker.failed(), "the first failure opens it");
        assert!(!breaker.allow(), "skipped while open");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow(), "one probe after the cool-down");
        assert!(!breaker.allow(), "only one");
        assert!(breaker.succeeded(), "a successful probe closes it");
        assert!(breaker.allow());
    }
}
