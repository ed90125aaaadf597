use std::time::Duration;

use platform::{
    cli::ShutdownSignal,
    config::{Env, Secret},
    service::{GrpcService, ServiceConfig},
};
use tokio::net::TcpListener;

use crate::{
    SPEC, password::HasherConfig, retention::RetentionConfig, throttle::ThrottleConfig,
    tokens::RefreshTokens,
};

/// Everything the auth service reads from its environment (`AUTH_*`).
#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    pub tokens: TokenConfig,
    pub hasher: HasherConfig,
    pub throttle: ThrottleConfig,
    pub retention: RetentionConfig,
    pub service_clients: ServiceClients,
}

/// The internal services that may obtain service tokens (`IssueServiceToken`), each with
/// the SHA-256 of its client secret: `AUTH_SERVICE_CLIENTS=gateway=<hex>,profile=<hex>,…`.
/// Only digests live in auth's config; each service holds its own secret. The secrets are
/// 256-bit random values, so a plain SHA-256 is as strong as a password hash here.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ServiceClients(Vec<(String, [u8; 32])>);

impl std::fmt::Debug for ServiceClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl ServiceClients {
    pub fn from_env(env: &Env) -> Self {
        let Some(text) = env.optional::<String>("SERVICE_CLIENTS") else {
            return Self::default();
        };
        match Self::parse(&text) {
            Ok(clients) => clients,
            Err(problem) => {
                env.problem(&env.name("SERVICE_CLIENTS"), problem);
                Self::default()
            }
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut clients = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, digest) = entry
                .split_once('=')
                .ok_or_else(|| format!("`{entry}` is not name=<sha256 hex>"))?;
            let name = name.trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(format!("`{name}` is not a service name (a-z, 0-9, -)"));
            }
            let digest = decode_sha256_hex(digest.trim())
                .ok_or_else(|| format!("the digest for `{name}` is not 64 hex digits"))?;
            if clients.iter().any(|(n, _)| n == name) {
                return Err(format!("`{name}` is listed twice"));
            }
            clients.push((name.to_owned(), digest));
        }
        Ok(Self(clients))
    }

    /// Whether `secret` is the client secret of the service `name` (constant time in the
    /// secret).
    pub fn authenticates(&self, name: &str, secret: &str) -> bool {
        use sha2::{Digest as _, Sha256};
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.0.iter().any(|(n, digest)| {
            n == name
                && digest
                    .iter()
                    .zip(presented.iter())
                    .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                    == 0
        })
    }
}

fn decode_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// Token and session settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// `AUTH_TOKEN_ISSUER` (`iss`), default `svcset-auth`.
    pub issuer: String,
    /// `AUTH_TOKEN_AUDIENCE` (`aud`), default `svcset`.
    pub audience: String,
    /// `AUTH_ACCESS_TOKEN_TTL`, default 15m, at most 1h.
    pub access_ttl: Duration,
    /// Ed25519 private keys (PKCS#8 PEM), newest first: from `AUTH_SIGNING_KEYS` (PEM text)
    /// or `AUTH_SIGNING_KEY_FILES` (comma-separated paths).
    pub signing_keys: Vec<Secret>,
    /// `AUTH_REFRESH_TOKEN_SECRET`: keys the derivation of refresh-token successors.
    pub refresh_secret: Secret,
    /// `AUTH_REFRESH_GRACE_PERIOD`, default 10s: duplicates of a refresh within it get the
    /// same successor; reuse after it revokes the session.
    pub refresh_grace: Duration,
    /// `AUTH_SESSION_IDLE_TIMEOUT`, default 720h (30 days) without a refresh.
    pub session_idle_timeout: Duration,
    /// `AUTH_SESSION_LIFETIME`, default 2160h (90 days) from login, refreshes or not.
    pub session_lifetime: Duration,
}

impl TokenConfig {
    pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
    pub const MAX_ACCESS_TTL: Duration = platform::access_token::MAX_LIFETIME;
    pub const DEFAULT_REFRESH_GRACE: Duration = Duration::from_secs(10);
    pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
    pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

    fn from_env(env: &Env) -> Self {
        let config = Self {
            issuer: env.or(
                "TOKEN_ISSUER",
                platform::access_token::DEFAULT_ISSUER.to_owned(),
            ),
            audience: env.or(
                "TOKEN_AUDIENCE",
                platform::access_token::DEFAULT_AUDIENCE.to_owned(),
            ),
            access_ttl: env.duration_or("ACCESS_TOKEN_TTL", Self::DEFAULT_ACCESS_TTL),
            signing_keys: signing_keys(env),
            refresh_secret: env.required("REFRESH_TOKEN_SECRET"),
            refresh_grace: env.duration_or("REFRESH_GRACE_PERIOD", Self::DEFAULT_REFRESH_GRACE),
            session_idle_timeout: env
                .duration_or("SESSION_IDLE_TIMEOUT", Self::DEFAULT_SESSION_IDLE_TIMEOUT),
            session_lifetime: env.duration_or("SESSION_LIFETIME", Self::DEFAULT_SESSION_LIFETIME),
        };
        if config.access_ttl > Self::MAX_ACCESS_TTL || config.access_ttl.is_zero() {
            env.problem(
                &env.name("ACCESS_TOKEN_TTL"),
                "must be between 1s and 1h: revocation relies on short-lived tokens".to_owned(),
            );
        }
        let secret_len = config.refresh_secret.expose().len();
        if secret_len > 0 && secret_len < RefreshTokens::MIN_SECRET_LEN {
            env.problem(
                &env.name("REFRESH_TOKEN_SECRET"),
                format!(
                    "must be at least {} characters of randomness",
                    RefreshTokens::MIN_SECRET_LEN
                ),
            );
        }
        if config.session_idle_timeout > config.session_lifetime {
            env.problem(
                &env.name("SESSION_IDLE_TIMEOUT"),
                format!("is longer than {}", env.name("SESSION_LIFETIME")),
            );
        }
        config
    }
}

/// Splits PEM text holding one or more keys into one `Secret` per key, in order.
fn split_pem_keys(text: &str) -> Vec<Secret> {
    const END: &str = "-----END PRIVATE KEY-----";
    text.split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.contains("-----BEGIN"))
        .map(Secret::new)
        .collect()
}

fn signing_keys(env: &Env) -> Vec<Secret> {
    let inline: Option<Secret> = env.optional("SIGNING_KEYS");
    let files: Option<String> = env.optional("SIGNING_KEY_FILES");
    match (inline, files) {
        (Some(text), None) => split_pem_keys(text.expose()),
        (None, Some(paths)) => {
            let mut keys = Vec::new();
            for path in paths.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match std::fs::read_to_string(path) {
                    Ok(text) => keys.extend(split_pem_keys(&text)),
                    Err(e) => env.problem(
                        &env.name("SIGNING_KEY_FILES"),
                        format!("cannot read `{path}`: {e}"),
                    ),
                }
            }
            keys
        }
        (Some(_), Some(_)) => {
            env.problem(
                &env.name("SIGNING_KEYS"),
                format!(
                    "set either this or {}, not both",
                    env.name("SIGNING_KEY_FILES")
                ),
            );
            Vec::new()
        }
        (None, None) => {
            env.problem(
                &env.name("SIGNING_KEYS"),
                format!(
                    "missing (required): Ed25519 PKCS#8 PEM keys, or paths in {}",
                    env.name("SIGNING_KEY_FILES")
                ),
            );
            Vec::new()
        }
    }
}

impl HasherConfig {
    /// The smallest memory × iterations among OWASP's argon2id configurations
    /// (m=7168 KiB, t=5): anything cheaper is refused.
    const MIN_COST: u64 = 7168 * 5;

    fn from_env(env: &Env) -> Self {
        let workers = env.or("HASH_WORKERS", Self::default_workers());
        let config = Self {
            memory_kib: env.or("ARGON2_MEMORY_KIB", Self::OWASP_MEMORY_KIB),
            iterations: env.or("ARGON2_ITERATIONS", Self::OWASP_ITERATIONS),
            parallelism: env.or("ARGON2_PARALLELISM", Self::OWASP_PARALLELISM),
            workers,
            queue: env.or("HASH_QUEUE", workers.max(1) * 8),
        };
        if config.memory_kib < 7168
            || u64::from(config.memory_kib) * u64::from(config.iterations) < Self::MIN_COST
        {
            env.problem(
                &env.name("ARGON2_MEMORY_KIB"),
                "with ARGON2_ITERATIONS is below OWASP's argon2id minimum (e.g. m=19456, t=2)"
                    .to_owned(),
            );
        }
        if config.parallelism == 0 || config.workers == 0 || config.queue == 0 {
            env.problem(
                &env.name("HASH_WORKERS"),
                "workers, queue and parallelism must be at least 1".to_owned(),
            );
        }
        config
    }
}

impl GrpcService for Config {
    const SPEC: platform::service::ServiceSpec = SPEC;

    fn from_env(env: &Env) -> Self {
        let tokens = TokenConfig::from_env(env);
        Self {
            service: ServiceConfig::from_env(&SPEC, env),
            hasher: HasherConfig::from_env(env),
            throttle: ThrottleConfig::from_env(env),
            retention: RetentionConfig::from_env(env, tokens.access_ttl),
            service_clients: ServiceClients::from_env(env),
            tokens,
        }
    }

    fn service_config(&self) -> &ServiceConfig {
        &self.service
    }

    async fn serve(self, listener: TcpListener, shutdown: ShutdownSignal) -> anyhow::Result<()> {
        crate::serve(self, listener, shutdown).await
    }

    const COMMANDS_USAGE: &'static str = "       auth grant-role EMAIL ROLE   give an account a role (the first admin, say) and exit\n       auth seed-users COUNT [PASSWORD]\n                                    create user0..user<COUNT-1>@example.com for load tests\n                                    (one hash for all; default password: correct horse battery staple)\n";

    fn command(self, args: &[String]) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        type Command = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
        let command: Command = match args {
            [name, email, role] if name == "grant-role" => {
                let (email, role) = (email.clone(), role.clone());
                Box::pin(async move { crate::grant_role(&self, &email, &role).await })
            }
            [name, count, rest @ ..] if name == "seed-users" && rest.len() <= 1 => {
                let count = count.clone();
                let password = rest.first().cloned();
                Box::pin(async move {
                    let count = count.parse::<u32>().map_err(|_| {
                        anyhow::anyhow!("COUNT must be a whole number, got {count}")
                    })?;
                    crate::seed_users(&self, count, password.as_deref()).await
                })
            }
            _ => return None,
        };
        Some(command)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn service_clients_authenticate_by_digest_and_refuse_junk() {
        // sha256("s3cret")
        let digest = "9c3a0ffc8a1ebd6ebec4fd3ef2e1ba3c5c5e7dac1a3b4fb2cbd2c1c7a4f1f5b8";
        let real = {
            use sha2::{Digest as _, Sha256};
            Sha256::digest(b"s3cret")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let clients = ServiceClients::parse(&format!("gateway={real}, notes={digest}")).unwrap();
        assert!(clients.authenticates("gateway", "s3cret"));
        assert!(!clients.authenticates("gateway", "s3cret "));
        assert!(!clients.authenticates("profile", "s3cret"));
        assert!(ServiceClients::parse("gateway").is_err());
        assert!(ServiceClients::parse("gateway=abc").is_err());
        assert!(ServiceClients::parse(&format!("Gate way={real}")).is_err());
        assert!(ServiceClients::parse(&format!("a={real},a={real}")).is_err());
        assert_eq!(
            ServiceClients::parse("").unwrap(),
            ServiceClients::default()
        );
    }

    #[test]
    fn pem_text_splits_into_keys_in_order() {
        let one = "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----";
        let two = "-----BEGIN PRIVATE KEY-----\nBBB\n-----END PRIVATE KEY-----";
        let keys = split_pem_keys(&format!("{one}\n{two}\n"));
        assert_eq!(keys.len(), 2);
        assert!(keys[0].expose().contains("AAA"));
        assert!(keys[1].expose().contains("BBB"));
    }

    #[test]
    fn weak_argon2_and_missing_keys_are_named() {
        let env = Env::from_pairs(
            "AUTH",
            [
                ("AUTH_DATABASE_URL", "postgres://app@127.0.0.1:1/auth"),
                ("AUTH_REDIS_URL", "redis://127.0.0.1:1/0"),
                ("AUTH_REFRESH_TOKEN_SECRET", "short"),
                ("AUTH_ARGON2_MEMORY_KIB", "4096"),
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
            [
                "AUTH_SIGNING_KEYS",
                "AUTH_REFRESH_TOKEN_SECRET",
                "AUTH_ARGON2_MEMORY_KIB"
            ]
        );
    }
}
