//! The profile service (`profile.v1.ProfileService`): profiles, subscriptions, plans and catalogs.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// Email and roles from auth (`GetUser`), cached and evicted by auth's changes.
pub mod auth_users;
/// The caches: names, keys, TTLs and encoded shapes, in one place.
pub mod cache;
/// Settings (`PROFILE_*` environment variables).
pub mod config;
/// Validated inputs and field masks.
pub mod domain;
/// Every failure and its one mapping to a gRPC status.
pub mod error;
/// `profile.v1.ProfileService`: protobuf ↔ domain, no SQL.
pub mod grpc;
/// All of profile's SQL.
pub mod store;
/// Who was active recently, and loading their profiles into the caches.
pub mod warming;

use std::future::Future;

use platform::{
    cache::CacheBus,
    grpc::ClientConfig,
    identity::Identity,
    service::{self, Resources, ServiceSpec},
};
use proto::profile::v1::profile_service_server;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::Config;

/// The migrations in `migrations/profile`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/profile");

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "profile",
    env_prefix: "PROFILE",
    default_port: 50052,
    grpc_services: &[profile_service_server::SERVICE_NAME],
    file_descriptor_set: proto::FILE_DESCRIPTOR_SET,
    migrator: &MIGRATOR,
};

/// Serves the profile service on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let resources = Resources::connect(&SPEC, &config.service)?;
    let auth_channel =
        platform::grpc::lazy_channel(&config.identity.auth_url, ClientConfig::default())?;
    // Who is calling, verified locally; service tokens for calls to auth; auth's changes.
    let identity = Identity::start(&config.identity, SPEC.name, auth_channel, true);
    let bus = CacheBus::start(
        resources.redis.clone(),
        &config.service.redis,
        config.cache.settings.clone(),
    );
    let caches = cache::Caches::new(bus, &config.cache);
    let store = store::Store::new(resources.db.clone());
    let auth_users = auth_users::AuthUsers::new(identity.clone(), caches.auth_users.clone());
    let activity = warming::Activity::default();
    let mut background = vec![
        tokio::spawn(
            activity
                .clone()
                .flush_forever(store.clone(), config.warming.activity_flush_interval),
        ),
        tokio::spawn(auth_users.clone().follow_changes()),
    ];
    if config.warming.on_start {
        background.push(tokio::spawn(warming::warm_at_start(
            store.clone(),
            caches.clone(),
            config.warming.window,
            config.warming.max_per_second,
            config.warming.max_profiles,
        )));
    }
    let pools = resources.pools(&SPEC, &config.service);
    let api = grpc::ProfileApi::new(
        store,
        caches,
        identity,
        auth_users,
        activity,
        config.warming.clone(),
        pools,
        config.service.telemetry.instance_id.clone(),
    );
    let routes = Routes::new(profile_service_server::ProfileServiceServer::new(api));
    let served = service::serve(
        &SPEC,
        &config.service,
        &resources,
        routes,
        listener,
        shutdown,
    )
    .await;
    for task in background {
        task.abort();
    }
    served
}
