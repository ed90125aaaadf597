//! The profile service (`profile.v1.ProfileService`): profiles, subscriptions, plans and catalogs.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// Settings (`PROFILE_*` environment variables).
pub mod config;

use std::future::Future;

use platform::service::{self, Resources, ServiceSpec};
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
    let routes = Routes::default();
    service::serve(
        &SPEC,
        &config.service,
        &resources,
        routes,
        listener,
        shutdown,
    )
    .await
}
