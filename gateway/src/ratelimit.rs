//! Rate limits at the edge: per signed-in user, per client address for anonymous requests,
//! and per route class, shared by every gateway replica through the gateway's Redis.
//!
//! Each tier is a GCRA (generic cell rate algorithm) limit: `limit` requests per `period`,
//! spread out, with a burst of up to `limit` at once. One Lua script checks every tier that
//! applies to a request and consumes from all of them or none, so a check is one atomic
//! round trip. When Redis fails, the same algorithm runs in this process for a few seconds
//! before Redis is tried again: limits then hold per replica instead of across them, and no
//! request waits on a Redis that is down.
//!
//! Signed-in requests are keyed by user only — many mobile users share one carrier NAT
//! address, so an address limit must never cap them. Anonymous requests (login, register,
//! refresh) are keyed by the client address, which is the socket's peer unless that peer is
//! a trusted proxy (`GATEWAY_TRUSTED_PROXIES`), in which case `X-Forwarded-For` is read from
//! the right, past every trusted hop.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use platform::{
    config::{Env, HumanDuration},
    identity::{Caller, Identity},
    redis_pool::{CommandSpan as _, RedisConfig, RedisPool},
};
use tokio::time::Instant;

use crate::{
    context::ClientAddr,
    error::{ApiError, ErrorCode},
};

/// One tier's allowance: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub period: Duration,
}

/// A tier's setting: `<limit>/<period>` (`60/1m`, `1000/24h`) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSetting(pub Option<Quota>);

impl FromStr for QuotaSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        let (limit, period) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not `<limit>/<period>` (e.g. 60/1m) or `off`"))?;
        let limit = limit
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| format!("`{limit}` is not a positive whole number"))?;
        let HumanDuration(period) = period.trim().parse::<HumanDuration>()?;
        if period.is_zero() {
            return Err("the period must be longer than zero".to_owned());
        }
        Ok(Self(Some(Quota { limit, period })))
    }
}

/// The tiers, named as they appear in `RateLimit-Policy` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Every API request, per user (or per address when anonymous): short bursts.
    Burst,
    /// Every API request, per user (or address): the daily allowance.
    Sustained,
    /// AI generation requests, per user.
    Ai,
    /// Login, register and refresh, per client address: stricter, against guessing.
    Login,
}

impl Tier {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Burst => "burst",
            Self::Sustained => "sustained",
            Self::Ai => "ai",
            Self::Login => "login",
        }
    }
}

/// Rate-limit settings (`GATEWAY_RATE_LIMIT_*`, `GATEWAY_TRUSTED_PROXIES`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// `GATEWAY_RATE_LIMIT_BURST`, default `60/1m`.
    pub burst: Option<Quota>,
    /// `GATEWAY_RATE_LIMIT_SUSTAINED`, default `1000/24h`.
    pub sustained: Option<Quota>,
    /// `GATEWAY_RATE_LIMIT_AI`, default `20/1h`.
    pub ai: Option<Quota>,
    /// `GATEWAY_RATE_LIMIT_LOGIN`, default `10/1m`.
    pub login: Option<Quota>,
    /// `GATEWAY_TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks whose
    /// `X-Forwarded-For` is believed (default: none).
    pub trusted_proxies: TrustedProxies,
}

impl RateLimitConfig {
    pub fn from_env(env: &Env) -> Self {
        let scale: f64 = env.or("RATE_LIMIT_SCALE", 1.0);
        if !(scale.is_finite() && scale > 0.0) {
            env.problem(
                &env.name("RATE_LIMIT_SCALE"),
                "must be a number above zero".to_owned(),
            );
        }
        let tier = |name: &str, default: Quota| {
            env.or(name, QuotaSetting(Some(default)))
                .0
                .map(|quota| scaled(quota, scale))
        };
        let minute = Duration::from_secs(60);
        Self {
            burst: tier(
                "RATE_LIMIT_BURST",
                Quota {
                    limit: 60,
                    period: minute,
                },
            ),
            sustained: tier(
                "RATE_LIMIT_SUSTAINED",
                Quota {
                    limit: 1000,
                    period: Duration::from_secs(24 * 3600),
                },
            ),
            ai: tier(
                "RATE_LIMIT_AI",
                Quota {
                    limit: 20,
                    period: Duration::from_secs(3600),
                },
            ),
            login: tier(
                "RATE_LIMIT_LOGIN",
                Quota {
                    limit: 10,
                    period: minute,
                },
            ),
            trusted_proxies: env.or("TRUSTED_PROXIES", TrustedProxies::default()),
        }
    }

    fn quota(&self, tier: Tier) -> Option<Quota> {
        match tier {
            Tier::Burst => self.burst,
            Tier::Sustained => self.sustained,
            Tier::Ai => self.ai,
            Tier::Login => self.login,
        }
    }

    /// One line for start-up logs and benchmark output: what is limited, what is off.
    pub fn describe(&self) -> String {
        [Tier::Burst, Tier::Sustained, Tier::Ai, Tier::Login]
            .map(|tier| match self.quota(tier) {
                Some(q) => format!("{}={}/{}s", tier.name(), q.limit, q.period.as_secs()),
                None => format!("{}=off", tier.name()),
            })
            .join(" ")
    }
}

/// `GATEWAY_RATE_LIMIT_SCALE` multiplies every limit (benchmarks raise them this way).
fn scaled(quota: Quota, scale: f64) -> Quota {
    let limit = (f64::from(quota.limit) * scale)
        .round()
        .clamp(1.0, f64::from(u32::MAX));
    Quota {
        // In range by the clamp above.
        limit: limit as u32,
        ..quota
    }
}

/// Addresses and CIDR blocks of proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut blocks = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (address, bits) = entry.split_once('/').unwrap_or((entry, ""));
            let address: IpAddr = address
                .parse()
                .map_err(|_| format!("`{entry}` is not an address or CIDR block"))?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let bits = if bits.is_empty() {
                max
            } else {
                bits.parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("`{entry}` has a bad prefix length"))?
            };
            blocks.push((address, bits));
        }
        Ok(Self(blocks))
    }
}

impl TrustedProxies {
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.0
            .iter()
            .any(|&(block, bits)| match (canonical(block), address) {
                (IpAddr::V4(block), IpAddr::V4(address)) => {
                    prefix_matches(&block.octets(), &address.octets(), bits)
                }
                (IpAddr::V6(block), IpAddr::V6(address)) => {
                    prefix_matches(&block.octets(), &address.octets(), bits)
                }
                _ => false,
            })
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(address) => {
                    client = address;
                    if !self.contains(address) {
                        break;
                    }
                }
                // A malformed entry ends what can be believed.
                Err(_) => break,
            }
        }
        client
    }
}

fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_matches(block: &[u8], address: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if block.get(..whole) != address.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (block.get(whole), address.get(whole)) {
        (Some(b), Some(a)) => b & mask == a & mask,
        _ => false,
    }
}

/// Login, register and refresh: anonymous, and answered with credentials.
pub(crate) fn is_credential_route(route: &str) -> bool {
    matches!(
        route,
        "/api/v1/auth/login" | "/api/v1/auth/register" | "/api/v1/auth/refresh"
    )
}

/// Which tiers a route belongs to, beyond burst and sustained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteClass {
    /// Anonymous credential routes: also the login tier, per address.
    Credentials,
    /// AI generation: also the AI tier, per user.
    Ai,
    Other,
}

impl RouteClass {
    fn of(route: &str) -> Self {
        if is_credential_route(route) {
            Self::Credentials
        } else if route.ends_with("/generate") {
            Self::Ai
        } else {
            Self::Other
        }
    }
}

/// A verified caller, left in the request's extensions for the route (one verification per
/// request).
#[derive(Debug, Clone)]
pub struct Verified(pub Caller);

/// The limiter every gateway replica shares through Redis.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    config: RateLimitConfig,
    identity: Identity,
    redis: RedisPool,
    redis_config: RedisConfig,
    script: redis::Script,
    local: Mutex<LocalCells>,
    /// While set and in the future, Redis is skipped.
    redis_down_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("tiers", &self.inner.config.describe())
            .finish_non_exhaustive()
    }
}

/// How long Redis is left alone after it failed.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The most a rate-limit check may add to a request before the local limiter decides.
const REDIS_CHECK_TIMEOUT: Duration = Duration::from_millis(250);

/// GCRA over several keys, all or nothing. KEYS: one per tier. ARGV: for each key, its
/// emission interval and period in microseconds. Uses the server's clock, so replicas with
/// skewed clocks agree. Returns {allowed, retry_after_us, remaining_1, reset_us_1, ...}.
const GCRA_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local allowed = 1
local retry_after = 0
local new_tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at > now then
    allowed = 0
    if allow_at - now > retry_after then retry_after = allow_at - now end
  end
  new_tats[i] = {tat, new_tat, interval, period}
end
local result = {allowed, retry_after}
for i = 1, #KEYS do
  local tat, new_tat, interval, period = unpack(new_tats[i])
  local used = tat
  if allowed == 1 then
    used = new_tat
    redis.call('SET', KEYS[i], new_tat, 'PX', math.ceil(period / 1000) + 1000)
  end
  local remaining = math.floor((now + period - used) / interval)
  if remaining < 0 then remaining = 0 end
  result[#result + 1] = remaining
  result[#result + 1] = used - now
end
return result
";

/// One tier checked for one key.
#[derive(Debug, Clone)]
struct Check {
    tier: Tier,
    quota: Quota,
    key: String,
}

/// What the limiter decided, with what the headers report.
#[derive(Debug, Clone)]
struct Decision {
    allowed: bool,
    retry_after: Duration,
    /// Per check, in order: requests left and time until the tier is full again.
    states: Vec<(u64, Duration)>,
}

impl RateLimiter {
    pub fn new(
        config: RateLimitConfig,
        identity: Identity,
        redis: RedisPool,
        redis_config: RedisConfig,
    ) -> Self {
        tracing::info!(tiers = %config.describe(), "rate limits");
        Self {
            inner: Arc::new(LimiterInner {
                config,
                identity,
                redis,
                redis_config,
                script: redis::Script::new(GCRA_SCRIPT),
                local: Mutex::new(LocalCells::default()),
                redis_down_until: Mutex::new(None),
            }),
        }
    }

    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.inner.config.trusted_proxies
    }

    async fn decide(&self, checks: &[Check]) -> Decision {
        let skip_redis = self
            .inner
            .redis_down_until
            .lock()
            .map(|until| until.is_some_and(|t| Instant::now() < t))
            .unwrap_or(false);
        if !skip_redis {
            match tokio::time::timeout(REDIS_CHECK_TIMEOUT, self.decide_in_redis(checks)).await {
                Ok(Ok(decision)) => return decision,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "rate limits: Redis failed; limiting locally")
                }
                Err(_) => tracing::warn!("rate limits: Redis too slow; limiting locally"),
            }
            if let Ok(mut until) = self.inner.redis_down_until.lock() {
                *until = Some(Instant::now() + REDIS_RETRY_AFTER);
            }
        }
        metrics::counter!("ratelimit_local_decisions_total").increment(1);
        let now = unix_micros();
        match self.inner.local.lock() {
            Ok(mut cells) => cells.decide(checks, now),
            Err(poisoned) => poisoned.into_inner().decide(checks, now),
        }
    }

    async fn decide_in_redis(&self, checks: &[Check]) -> Result<Decision, redis::RedisError> {
        let mut conn = self.inner.redis.get().await.map_err(|e| match e {
            bb8_redis::bb8::RunError::User(e) => e,
            bb8_redis::bb8::RunError::TimedOut => redis::RedisError::from((
                redis::ErrorKind::Io,
                "timed out waiting for a Redis connection",
            )),
        })?;
        let mut invocation = self.inner.script.prepare_invoke();
        for check in checks {
            let (interval, period) = micros(check.quota);
            invocation
                .key(self.inner.redis_config.key(&check.key))
                .arg(interval)
                .arg(period);
        }
        let reply: Vec<i64> = invocation
            .invoke_async(&mut *conn)
            .command("gateway.ratelimit.check")
            .await?;
        decision_from(&reply, checks.len()).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Parse, "unexpected rate-limit reply"))
        })
    }
}

/// (emission interval, period) in microseconds.
fn micros(quota: Quota) -> (i64, i64) {
    let period = i64::try_from(quota.period.as_micros()).unwrap_or(i64::MAX);
    (period / i64::from(quota.limit).max(1), period)
}

fn decision_from(reply: &[i64], checks: usize) -> Option<Decision> {
    if reply.len() != 2 + 2 * checks {
        return None;
    }
    let duration = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
    Some(Decision {
        allowed: reply[0] == 1,
        retry_after: duration(reply[1]),
        states: reply[2..]
            .chunks(2)
            .map(|pair| (u64::try_from(pair[0]).unwrap_or(0), duration(pair[1])))
            .collect(),
    })
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The same GCRA in this process, for when Redis is down.
#[derive(Debug, Default)]
struct LocalCells {
    /// Key → theoretical arrival time (µs), and when the key may be forgotten.
    tats: HashMap<String, (i64, i64)>,
}

/// Keys kept before expired ones are swept.
const LOCAL_SWEEP_AT: usize = 100_000;

impl LocalCells {
    fn decide(&mut self, checks: &[Check], now: i64) -> Decision {
        if self.tats.len() >= LOCAL_SWEEP_AT {
            self.tats.retain(|_, (_, forget_at)| *forget_at > now);
        }
        let mut allowed = true;
        let mut retry_after = 0;
        let mut planned = Vec::with_capacity(checks.len());
        for check in checks {
            let (interval, period) = micros(check.quota);
            let tat = self
                .tats
                .get(&check.key)
                .map_or(now, |(tat, _)| *tat)
                .max(now);
            let new_tat = tat + interval;
            let allow_at = new_tat - period;
            if allow_at > now {
                allowed = false;
                retry_after = retry_after.max(allow_at - now);
            }
            planned.push((tat, new_tat, interval, period));
        }
        let mut reply = vec![i64::from(allowed), retry_after];
        for (check, (tat, new_tat, interval, period)) in checks.iter().zip(planned) {
            let used = if allowed {
                self.tats
                    .insert(check.key.clone(), (new_tat, new_tat + period));
                new_tat
            } else {
                tat
            };
            reply.push(((now + period - used) / interval).max(0));
            reply.push(used - now);
        }
        decision_from(&reply, checks.len()).unwrap_or(Decision {
            allowed: true,
            retry_after: Duration::ZERO,
            states: Vec::new(),
        })
    }
}

/// The middleware: verifies the caller once (leaving [`Verified`] for the route), works out
/// the client address, checks every tier that applies, and answers 429 or adds the
/// `RateLimit` headers.
pub(crate) async fn rate_limit(
    State(limiter): State<RateLimiter>,
    mut request: Request,
    next: Next,
) -> Response {
    let inner = &limiter.inner;
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let client = peer.map(|peer| {
        inner
            .config
            .trusted_proxies
            .client_address(peer, request.headers())
    });
    request.extensions_mut().insert(ClientAddr(client));

    let caller = match platform::access_token::bearer_header(request.headers()) {
        Some(token) => inner.identity.verify(token).await.ok(),
        None => None,
    };
    let address_key = client.map_or_else(|| "ip:unknown".to_owned(), |ip| format!("ip:{ip}"));
    let principal_key = match &caller {
        Some(Caller::User { user_id, .. }) => format!("user:{user_id}"),
        Some(Caller::Service { name }) => format!("service:{name}"),
        None => address_key.clone(),
    };
    let class = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(RouteClass::Other, |path| RouteClass::of(path.as_str()));
    if let Some(caller) = caller.clone() {
        request.extensions_mut().insert(Verified(caller));
    }

    let mut checks = Vec::with_capacity(3);
    let mut add = |tier: Tier, key: &str| {
        if let Some(quota) = inner.config.quota(tier) {
            checks.push(Check {
                tier,
                quota,
                key: format!("rl:{}:{key}", tier.name()),
            });
        }
    };
    add(Tier::Burst, &principal_key);
    add(Tier::Sustained, &principal_key);
    match class {
        RouteClass::Credentials => add(Tier::Login, &address_key),
        RouteClass::Ai if caller.is_some() => add(Tier::Ai, &principal_key),
        RouteClass::Ai | RouteClass::Other => {}
    }
    if checks.is_empty() {
        return next.run(request).await;
    }

    let decision = limiter.decide(&checks).await;
    if !decision.allowed {
        let tier = tightest(&checks, &decision).map_or("", |c| c.tier.name());
        metrics::counter!("ratelimit_rejections_total", "tier" => tier).increment(1);
        let mut response = ApiError::new(
            ErrorCode::RateLimited,
            format!("the `{tier}` rate limit is spent; retry later"),
        )
        .with_retry_after(decision.retry_after)
        .into_response();
        set_headers(response.headers_mut(), &checks, &decision);
        return response;
    }
    let mut response = next.run(request).await;
    set_headers(response.headers_mut(), &checks, &decision);
    response
}

/// The check with the fewest requests left: the one the `RateLimit` header reports.
fn tightest<'a>(checks: &'a [Check], decision: &Decision) -> Option<&'a Check> {
    checks
        .iter()
        .zip(&decision.states)
        .min_by_key(|(_, (remaining, reset))| (*remaining, std::cmp::Reverse(*reset)))
        .map(|(check, _)| check)
}

/// `RateLimit-Policy` lists every tier applied; `RateLimit` reports the tightest, as the
/// IETF httpapi draft defines them (`q` quota, `w` window, `r` remaining, `t` seconds to
/// full).
fn set_headers(headers: &mut HeaderMap, checks: &[Check], decision: &Decision) {
    let policy = checks
        .iter()
        .map(|c| {
            format!(
                "\"{}\";q={};w={}",
                c.tier.name(),
                c.quota.limit,
                c.quota.period.as_secs()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.insert("ratelimit-policy", value);
    }
    let Some((check, (remaining, reset))) = checks
        .iter()
        .zip(&decision.states)
        .find(|(c, _)| tightest(checks, decision).is_some_and(|t| t.tier == c.tier))
    else {
        return;
    };
    let state = format!(
        "\"{}\";r={};t={}",
        check.tier.name(),
        remaining,
        reset.as_secs_f64().ceil()
    );
    if let Ok(value) = HeaderValue::from_str(&state) {
        headers.insert("ratelimit", value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(tier: Tier, limit: u32, secs: u64, key: &str) -> Check {
        Check {
            tier,
            quota: Quota {
                limit,
                period: Duration::from_secs(secs),
            },
            key: key.to_owned(),
        }
    }

    #[test]
    fn settings_parse_and_refuse_junk() {
        assert_eq!(
            "60/1m".parse::<QuotaSetting>(),
            Ok(QuotaSetting(Some(Quota {
                limit: 60,
                period: Duration::from_secs(60)
            })))
        );
        assert_eq!("OFF".parse::<QuotaSetting>(), Ok(QuotaSetting(None)));
        for junk in ["60", "0/1m", "x/1m", "60/0s", "60/soon"] {
            assert!(junk.parse::<QuotaSetting>().is_err(), "{junk}");
        }
    }

    #[test]
    fn scale_and_off_apply_per_tier() {
        let env = Env::from_pairs(
            "GATEWAY",
            [
                ("GATEWAY_RATE_LIMIT_SCALE", "10"),
                ("GATEWAY_RATE_LIMIT_AI", "off"),
            ],
        );
        let config = RateLimitConfig::from_env(&env);
        assert!(env.finish().is_ok());
        assert_eq!(config.burst.map(|q| q.limit), Some(600));
        assert_eq!(config.ai, None);
        assert_eq!(config.login.map(|q| q.limit), Some(100));
    }

    #[test]
    fn local_gcra_allows_the_burst_then_spaces_requests() {
        let mut cells = LocalCells::default();
        let checks = [check(Tier::Burst, 3, 3, "u")];
        let now = 1_000_000_000;
        for expected_left in [2, 1, 0] {
            let decision = cells.decide(&checks, now);
            assert!(decision.allowed);
            assert_eq!(decision.states[0].0, expected_left);
        }
        let refused = cells.decide(&checks, now);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // One emission interval later, one more.
        assert!(cells.decide(&checks, now + 1_000_000).allowed);
    }

    #[test]
    fn all_tiers_or_none_are_consumed() {
        let mut cells = LocalCells::default();
        let checks = [
            check(Tier::Burst, 5, 60, "burst:u"),
            check(Tier::Ai, 1, 60, "ai:u"),
        ];
        let now = 1_000_000_000;
        assert!(cells.decide(&checks, now).allowed);
        // The AI tier is spent: the request is refused, and the burst tier keeps its 4.
        assert!(!cells.decide(&checks, now).allowed);
        let burst_only = [check(Tier::Burst, 5, 60, "burst:u")];
        assert_eq!(cells.decide(&burst_only, now).states[0].0, 3);
    }

    #[test]
    fn client_address_believes_only_trusted_proxies() {
        let trusted: TrustedProxies = "10.0.0.0/8, ::1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.2.3"),
        );
        let proxy: IpAddr = "10.9.9.9".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        // Through trusted hops: the first untrusted from the right; the spoofed left part
        // is never reached.
        assert_eq!(
            trusted.client_address(proxy, &headers),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // A stranger's X-Forwarded-For is ignored.
        assert_eq!(trusted.client_address(stranger, &headers), stranger);
        assert!(trusted.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
    }

    #[test]
    fn route_classes() {
        assert_eq!(
            RouteClass::of("/api/v1/auth/login"),
            RouteClass::Credentials
        );
        assert_eq!(
            RouteClass::of("/api/v1/notes/{id}/generate"),
            RouteClass::Ai
        );
        assert_eq!(RouteClass::of("/api/v1/auth/sessions"), RouteClass::Other);
    }
}
