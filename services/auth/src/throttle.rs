//! Login throttling against brute force and credential stuffing.
//!
//! Failed logins are counted per account — keyed on the submitted, normalised email whether
//! or not an account exists, so a refusal says nothing about the account — and per client IP,
//! each in a fixed window. Past the limit, logins for that key are refused with
//! RESOURCE_EXHAUSTED and the time left in the window; the block lifts by itself when the
//! window ends, so nobody can lock a victim out for good. A successful login clears its
//! account's count.
//!
//! Counters live in auth's Redis, shared by every replica. When Redis fails, a per-process
//! counter takes over, and a breaker skips Redis for a few seconds so a dead Redis adds no
//! timeout to each login.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use platform::{
    config::Env,
    redis_pool::{CommandSpan as _, RedisConfig, RedisPool},
};
use sha2::{Digest as _, Sha256};

/// Limits (`AUTH_LOGIN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// `AUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT` (default 5) within the window.
    pub account_max_failures: u32,
    /// `AUTH_LOGIN_MAX_FAILURES_PER_IP` (default 50): higher, as many users share a NAT.
    pub ip_max_failures: u32,
    /// `AUTH_LOGIN_THROTTLE_WINDOW` (default 15m).
    pub window: Duration,
}

impl ThrottleConfig {
    pub const DEFAULT_ACCOUNT_MAX_FAILURES: u32 = 5;
    pub const DEFAULT_IP_MAX_FAILURES: u32 = 50;
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            account_max_failures: env.or(
                "LOGIN_MAX_FAILURES_PER_ACCOUNT",
                Self::DEFAULT_ACCOUNT_MAX_FAILURES,
            ),
            ip_max_failures: env.or("LOGIN_MAX_FAILURES_PER_IP", Self::DEFAULT_IP_MAX_FAILURES),
            window: env.duration_or("LOGIN_THROTTLE_WINDOW", Self::DEFAULT_WINDOW),
        };
        if config.window < Duration::from_secs(1) {
            env.problem(
                &env.name("LOGIN_THROTTLE_WINDOW"),
                "must be at least 1s".to_owned(),
            );
        }
        config
    }
}

/// Which limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Account,
    Ip,
}

impl Scope {
    fn label(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Ip => "ip",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carries the account's failures so far: a success clears them only when there are any,
    /// sparing the usual login a round trip.
    Allowed {
        account_failures: u32,
    },
    Blocked {
        scope: Scope,
        retry_after: Duration,
    },
}

/// How long Redis is skipped after it failed.
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(5);
/// Local counters kept at most; expired ones are swept when the map grows past it.
const LOCAL_MAX_KEYS: usize = 100_000;

#[derive(Debug)]
pub struct LoginThrottle {
    redis: RedisPool,
    keys: RedisConfig,
    config: ThrottleConfig,
    local: Mutex<HashMap<String, (u32, Instant)>>,
    started: Instant,
    /// Milliseconds since `started` until which Redis is skipped.
    redis_skipped_until: AtomicU64,
}

impl LoginThrottle {
    pub fn new(redis: RedisPool, keys: RedisConfig, config: ThrottleConfig) -> Self {
        Self {
            redis,
            keys,
            config,
            local: Mutex::new(HashMap::new()),
            started: Instant::now(),
            redis_skipped_until: AtomicU64::new(0),
        }
    }

    /// The account key: a hash of the normalised email, so Redis never holds addresses.
    pub fn account_key(normalised_email: &str) -> String {
        let digest = Sha256::digest(normalised_email.as_bytes());
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    fn redis_keys(&self, account: &str, ip: &str) -> [String; 2] {
        [
            self.keys.key(&format!("login-failures:account:{account}")),
            self.keys.key(&format!("login-failures:ip:{ip}")),
        ]
    }

    /// Whether a login for `account` from `ip` may proceed.
    pub async fn check(&self, account: &str, ip: &str) -> Verdict {
        let [account_key, ip_key] = self.redis_keys(account, ip);
        let counts = match self.redis_counts(&account_key, &ip_key).await {
            Some(counts) => counts,
            None => self.local_counts(&account_key, &ip_key),
        };
        let [(account_failures, account_ttl), (ip_failures, ip_ttl)] = counts;
        let verdict = if account_failures >= self.config.account_max_failures {
            Verdict::Blocked {
                scope: Scope::Account,
                retry_after: account_ttl,
            }
        } else if !ip.is_empty() && ip_failures >= self.config.ip_max_failures {
            Verdict::Blocked {
                scope: Scope::Ip,
                retry_after: ip_ttl,
            }
        } else {
            Verdict::Allowed { account_failures }
        };
        if let Verdict::Blocked { scope, .. } = verdict {
            metrics::counter!("auth_login_throttled_total", "scope" => scope.label()).increment(1);
        }
        verdict
    }

    /// Counts a failed login against both keys.
    pub async fn record_failure(&self, account: &str, ip: &str) {
        let [account_key, ip_key] = self.redis_keys(account, ip);
        let window_ms = u64::try_from(self.config.window.as_millis()).unwrap_or(u64::MAX);
        if self.redis_available() {
            let mut pipe = redis::pipe();
            pipe.cmd("INCR").arg(&account_key).ignore();
            pipe.cmd("PEXPIRE")
                .arg(&account_key)
                .arg(window_ms)
                .arg("NX")
                .ignore();
            if !ip.is_empty() {
                pipe.cmd("INCR").arg(&ip_key).ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&ip_key)
                    .arg(window_ms)
                    .arg("NX")
                    .ignore();
            }
            if self
                .run::<()>("auth.throttle.record_failure", pipe)
                .await
                .is_some()
            {
                return;
            }
        }
        let mut local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if local.len() > LOCAL_MAX_KEYS {
            local.retain(|_, (_, ends)| *ends > now);
        }
        let keys: &[&String] = if ip.is_empty() {
            &[&account_key]
        } else {
            &[&account_key, &ip_key]
        };
        for key in keys {
            let entry = local
                .entry((*key).clone())
                .or_insert((0, now + self.config.window));
            if entry.1 <= now {
                *entry = (0, now + self.config.window);
            }
            entry.0 = entry.0.saturating_add(1);
        }
    }

    /// A successful login clears its account's failures (not the IP's).
    pub async fn record_success(&self, account: &str) {
        let [account_key, _] = self.redis_keys(account, "");
        if self.redis_available() {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(&account_key).ignore();
            let _ = self.run::<()>("auth.throttle.clear", pipe).await;
        }
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&account_key);
    }

    async fn redis_counts(&self, account_key: &str, ip_key: &str) -> Option<[(u32, Duration); 2]> {
        if !self.redis_available() {
            return None;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(account_key);
        pipe.cmd("PTTL").arg(account_key);
        pipe.cmd("GET").arg(ip_key);
        pipe.cmd("PTTL").arg(ip_key);
        let (account, account_ttl, ip, ip_ttl): (Option<u32>, i64, Option<u32>, i64) =
            self.run("auth.throttle.count", pipe).await?;
        let ttl = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        Some([
            (account.unwrap_or(0), ttl(account_ttl)),
            (ip.unwrap_or(0), ttl(ip_ttl)),
        ])
    }

    fn local_counts(&self, account_key: &str, ip_key: &str) -> [(u32, Duration); 2] {
        let local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let read = |key: &str| match local.get(key) {
            Some((count, ends)) if *ends > now => (*count, *ends - now),
            _ => (0, Duration::ZERO),
        };
        [read(account_key), read(ip_key)]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn redis_available(&self) -> bool {
        self.now_ms() >= self.redis_skipped_until.load(Ordering::Relaxed)
    }

    /// Runs a pipeline; on any failure opens the breaker and answers `None`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        summary: &'static str,
        pipe: redis::Pipeline,
    ) -> Option<T> {
        let result = async {
            let mut conn = self.redis.get().await.map_err(|e| e.to_string())?;
            pipe.query_async::<T>(&mut *conn)
                .command(summary)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                let until =
                    self.now_ms() + u64::try_from(BREAKER_OPEN_FOR.as_millis()).unwrap_or(0);
                self.redis_skipped_until.store(until, Ordering::Relaxed);
                tracing::warn!(%error, "redis unavailable for login throttling: counting locally");
                None
            }
        }
    }
}
