//! The auth service (`auth.v1.AuthService`): accounts, login, rotating refresh tokens, sessions and roles.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

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
    let api = grpc::AuthApi::new(
        store,
        hasher,
        issuer,
        refresh,
        throttle,
        config.tokens.clone(),
    )?;
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
    served
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
