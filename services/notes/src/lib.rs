//! The notes service (`notes.v1.NotesService`): notes with chapters and topics, generation jobs and notifications.
//!
//! `main` is the shared [`platform::cli::main`]; tests start [`serve`] in-process on port 0.
//!
//! # Layout

/// The Redis cache of note details and list pages: keys, TTLs, per-user versions.
pub mod cache;
/// Settings (`NOTES_*` environment variables).
pub mod config;
/// Validated inputs: titles, bodies, tags, statuses, ids; ETags.
pub mod domain;
/// Every failure and its one mapping to a gRPC status.
pub mod error;
/// What generation jobs run: the `Generator` trait and the built-in offline generator.
pub mod generator;
/// `notes.v1.NotesService`: protobuf ↔ domain, no SQL.
pub mod grpc;
/// The durable generation-job queue (its SQL, with notifications') and its workers.
pub mod jobs;
/// Live notification fan-out across replicas through Redis pub/sub.
pub mod notifications;
/// The generator over an OpenAI-compatible chat-completions endpoint.
pub mod openai;
/// All of notes' SQL.
pub mod store;

use std::{future::Future, sync::Arc};

use platform::{
    grpc::ClientConfig,
    identity::Identity,
    service::{self, Resources, ServiceSpec},
};
use proto::{
    notes::v1::notes_service_server::{self, NotesServiceServer},
    profile::v1::profile_service_client::ProfileServiceClient,
};
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
    let auth_channel =
        platform::grpc::lazy_channel(&config.identity.auth_url, ClientConfig::default())?;
    let identity = Identity::start(&config.identity, SPEC.name, auth_channel, true);
    let cache = cache::NotesCache::new(
        resources.redis.clone(),
        config.service.redis.clone(),
        config.cache.clone(),
    );
    let store = store::Store::new(resources.db.clone());
    let profile_channel =
        platform::grpc::lazy_channel(&config.profile_url, ClientConfig::default())?;
    let hub = notifications::Hub::new(resources.redis.clone(), config.service.redis.clone());
    let queue = jobs::Queue::new(
        jobs::Jobs::new(resources.db.clone()),
        config.jobs.clone(),
        hub.clone(),
    );
    // Workers and the subscription stop with the server; a job running then is left to its
    // lease, exactly as if the process had died.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    hub.start(stopped.clone());
    let generator: Arc<dyn generator::Generator> = match &config.openai {
        Some(openai) => Arc::new(openai::OpenAi::new(openai.clone())),
        None => Arc::new(generator::Builtin),
    };
    queue.start(
        store.clone(),
        generator,
        config.notification_read_retention,
        stopped,
    );
    let api = grpc::NotesApi::new(
        store,
        cache,
        identity,
        grpc::Generation {
            queue,
            hub,
            profile: ProfileServiceClient::new(profile_channel),
            heartbeat: config.notification_heartbeat,
            stopped: stop.subscribe(),
        },
        grpc::Operations {
            pools: resources.pools(&SPEC, &config.service),
            instance: config.service.telemetry.instance_id.clone(),
        },
    );
    let routes = Routes::new(
        NotesServiceServer::new(api)
            .max_decoding_message_size(proto::notes::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::notes::MAX_MESSAGE_BYTES),
    );
    service::serve(
        &SPEC,
        &config.service,
        &resources,
        routes,
        listener,
        async move {
            shutdown.await;
            let _ = stop.send(true);
        },
    )
    .await
}
