//! The auth service (`auth.v1.AuthService`): accounts, login, rotating refresh tokens, sessions and roles.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// The change stream other processes follow (`WatchChanges`).
pub mod changes;
/// Settings (`AUTH_*` environment variables).
pub mod config;
/// Validated inputs: email, password (the policy), display name.
pub mod domain;
/// Every failure and its one mapping to a gRPC status.
pub mod error;
/// `auth.v1.AuthService`: protobuf ↔ domain, no SQL.
pub mod grpc;
/// argon2id on a bounded pool of worker threads.
pub mod password;
/// Scheduled pruning of ended sessions, rotated refresh tokens and old audit rows.
pub mod retention;
/// All of auth's SQL.
pub mod store;
/// Failed-login counters per account and per IP, in Redis with a local fallback.
pub mod throttle;
/// Signed access tokens, the key set, and refresh tokens.
pub mod tokens;

use std::future::Future;

use platform::service::{self, Resources, ServiceSpec};
use proto::auth::v1::auth_service_server;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::Config;

/// The migrations in `migrations/auth`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/auth");

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "auth",
    env_prefix: "AUTH",
    default_port: 50051,
    grpc_services: &[auth_service_server::SERVICE_NAME],
    file_descriptor_set: proto::FILE_DESCRIPTOR_SET,
    migrator: &MIGRATOR,
};

/// Serves the auth service on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let resources = Resources::connect(&SPEC, &config.service)?;
    let hasher = password::PasswordHasher::start(config.hasher)?;
    let issuer = tokens::TokenIssuer::from_pems(
        &config.tokens.signing_keys,
        &config.tokens.issuer,
        &config.tokens.audience,
        config.tokens.access_ttl,
    )?;
    let refresh = tokens::RefreshTokens::new(&config.tokens.refresh_secret)
        .map_err(|e| anyhow::anyhow!("refresh-token secret: {e}"))?;
    let throttle = throttle::LoginThrottle::new(
        resources.redis.clone(),
        config.service.redis.clone(),
        config.throttle,
    );
    let store = store::Store::new(resources.db.clone());
    let pruning = tokio::spawn(retention::run(
        store.clone(),
        config.retention,
        config.tokens.session_idle_timeout,
    ));
    let kids: Vec<String> = issuer.public_keys().into_iter().map(|k| k.kid).collect();
    let (changes, following) = changes::ChangeFeed::start(
        resources.db.clone(),
        store.clone(),
        config.tokens.access_ttl,
    );
    let announcing = tokio::spawn(announce_key_set(store.clone(), kids));
    let api = grpc::AuthApi::new(grpc::Parts {
        store,
        hasher,
        issuer,
        refresh,
        throttle,
        config: config.tokens.clone(),
        changes,
        service_clients: config.service_clients.clone(),
    })?;
    let routes = Routes::new(auth_service_server::AuthServiceServer::new(api));
    let served = service::serve(
        &SPEC,
        &config.service,
        &resources,
        routes,
        listener,
        shutdown,
    )
    .await;
    pruning.abort();
    following.abort();
    announcing.abort();
    served
}

/// Records this replica's key set in the change log once the database is reachable, so
/// verifiers fetch a new key before the first token signed with it reaches them.
async fn announce_key_set(store: store::Store, kids: Vec<String>) {
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match store.record_key_set(&kids).await {
            Ok(recorded) => {
                tracing::info!(?kids, recorded, "key set announced");
                return;
            }
            Err(e) => {
                // Before migrations have run the table may not exist yet: retry.
                tracing::debug!(error = %e, "cannot record the key set yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// `auth grant-role EMAIL ROLE`: applies migrations, then gives the account the role. How
/// the first admin is made; later admins are made over the API by an admin.
pub async fn grant_role(config: &Config, email: &str, role: &str) -> anyhow::Result<()> {
    platform::service::migrate_once(&SPEC, &config.service).await?;
    let db = platform::postgres::lazy_pool(&config.service.postgres, "auth-grant-role")?;
    let store = store::Store::new(db.clone());
    let email = domain::Email::parse("email", email)
        .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.message))?;
    let user_id = store
        .user_id_by_email(email.as_str())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no account with the email {}", email.as_str()))?;
    let outcome = store.set_role(user_id, role, true, None).await?;
    db.close().await;
    match outcome {
        store::RoleChange::Changed => tracing::info!(%user_id, role, "role granted"),
        store::RoleChange::Unchanged => tracing::info!(%user_id, role, "role already held"),
        store::RoleChange::UserNotFound => anyhow::bail!("no account with that id"),
        store::RoleChange::RoleNotFound => anyhow::bail!("no role named {role}"),
    }
    Ok(())
}

/// The password seeded accounts get unless another is given (the load generator's default).
pub const SEED_PASSWORD: &str = "correct horse battery staple";

/// `auth seed-users COUNT [PASSWORD]`: applies migrations, then creates the accounts
/// `user0@example.com` … `user<COUNT-1>@example.com` in batches, hashing the password once
/// (the argon2 cost per account is what a load test must not pay). Idempotent.
pub async fn seed_users(config: &Config, count: u32, password: Option<&str>) -> anyhow::Result<()> {
    const BATCH: u32 = 5_000;
    platform::service::migrate_once(&SPEC, &config.service).await?;
    let db = platform::postgres::lazy_pool(&config.service.postgres, "auth-seed-users")?;
    let store = store::Store::new(db.clone());
    let hasher = password::PasswordHasher::start(config.hasher)?;
    let password = domain::Password::parse_presented("password", password.unwrap_or(SEED_PASSWORD))
        .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.message))?;
    let hash = hasher.hash(password).await?;
    let started = std::time::Instant::now();
    let (mut first, mut created) = (0u32, 0u64);
    while first < count {
        let size = BATCH.min(count - first);
        let ids: Vec<uuid::Uuid> = (0..size).map(|_| uuid::Uuid::now_v7()).collect();
        created += store.seed_users(i64::from(first), &ids, &hash).await?;
        first += size;
    }
    db.close().await;
    tracing::info!(
        count,
        created,
        existing = u64::from(count) - created,
        elapsed_ms = started.elapsed().as_millis(),
        "seeded users"
    );
    Ok(())
}
