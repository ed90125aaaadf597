//! The notes service (`notes.v1.NotesService`): notes with chapters and topics, generation jobs and notifications.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// Settings (`NOTES_*` environment variables).
pub mod config;

use std::future::Future;

use platform::service::{self, Resources, ServiceSpec};
use proto::notes::v1::notes_service_server;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::Config;

/// The migrations in `migrations/notes`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/notes");

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "notes",
    env_prefix: "NOTES",
    default_port: 50053,
    grpc_services: &[notes_service_server::SERVICE_NAME],
    file_descriptor_set: proto::FILE_DESCRIPTOR_SET,
    migrator: &MIGRATOR,
};

/// Serves the notes service on `listener` until `shutdown` resolves, then drains.
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
