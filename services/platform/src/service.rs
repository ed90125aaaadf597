//! The life of a gRPC service, the same for auth, profile and notes: settings, pools,
//! migrations, health, reflection, serving, and the drain on shutdown.
//!
//! Health starts NOT_SERVING (overall, `""`, and each of the service's fully-qualified
//! names). A background task applies migrations (retrying while the database is unreachable)
//! and then reports SERVING whenever the database answers a ping. On shutdown, health turns
//! NOT_SERVING for good before the listener closes.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use sqlx::{PgPool, migrate::Migrator};
use tokio::{net::TcpListener, sync::watch};
use tonic::{service::Routes, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::Env,
    grpc, metrics,
    postgres::{self, PgConfig},
    redis_pool::{self, RedisConfig, RedisPool},
    shutdown::ShutdownConfig,
    telemetry::TelemetryConfig,
};

/// What distinguishes one service from another to the shared machinery.
#[derive(Debug)]
pub struct ServiceSpec {
    /// `auth`, `profile`, `notes`: the binary, `service.name`, and the default key prefix.
    pub name: &'static str,
    /// Prefix of its environment variables: `AUTH` → `AUTH_DATABASE_URL`.
    pub env_prefix: &'static str,
    pub default_port: u16,
    /// Fully-qualified gRPC service names it serves, e.g. `auth.v1.AuthService`.
    pub grpc_services: &'static [&'static str],
    /// Encoded file descriptor set for reflection.
    pub file_descriptor_set: &'static [u8],
    pub migrator: &'static Migrator,
}

/// Settings every service has (`<PREFIX>_*`).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// `<PREFIX>_LISTEN_ADDR`, default `127.0.0.1:<default port>`.
    pub listen_addr: SocketAddr,
    pub postgres: PgConfig,
    pub redis: RedisConfig,
    pub shutdown: ShutdownConfig,
    pub telemetry: TelemetryConfig,
    /// `<PREFIX>_MIGRATE_ON_START` (default true). Turn it off when a separate job runs
    /// `<binary> migrate` before each release.
    pub migrate_on_start: bool,
    /// `<PREFIX>_HEALTH_CHECK_INTERVAL` (default 2s): how often the database is pinged to
    /// decide SERVING / NOT_SERVING.
    pub health_check_interval: Duration,
}

impl ServiceConfig {
    pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);

    pub fn from_env(spec: &ServiceSpec, env: &Env) -> Self {
        let default_addr =
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, spec.default_port));
        Self {
            listen_addr: env.addr_or("LISTEN_ADDR", default_addr),
            postgres: PgConfig::from_env(env),
            redis: RedisConfig::from_env(env, &format!("{}:", spec.name)),
            shutdown: ShutdownConfig::from_env(env),
            telemetry: TelemetryConfig::from_env(env, spec.name),
            migrate_on_start: env.or("MIGRATE_ON_START", true),
            health_check_interval: env
                .duration_or("HEALTH_CHECK_INTERVAL", Self::DEFAULT_HEALTH_CHECK_INTERVAL),
        }
    }
}

/// The connections a service owns. Both pools connect lazily.
#[derive(Debug, Clone)]
pub struct Resources {
    pub db: PgPool,
    pub redis: RedisPool,
}

impl Resources {
    /// The pools as `/metrics` and `GetPoolStatus` report them.
    pub fn pools(&self, spec: &ServiceSpec, config: &ServiceConfig) -> metrics::Pools {
        metrics::Pools {
            service: spec.name,
            db: self.db.clone(),
            redis: self.redis.clone(),
            redis_max_connections: config.redis.max_connections,
        }
    }

    pub fn connect(spec: &ServiceSpec, config: &ServiceConfig) -> anyhow::Result<Self> {
        Ok(Self {
            db: postgres::lazy_pool(&config.postgres, spec.name)?,
            redis: redis_pool::lazy_pool(&config.redis)?,
        })
    }
}

/// The statuses reported over `grpc.health.v1` for `""` and each service name.
#[derive(Debug, Clone)]
struct Health {
    reporter: HealthReporter,
    services: &'static [&'static str],
}

impl Health {
    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// Serves `routes` plus health and reflection on `listener` until `shutdown` resolves, then
/// drains within the configured grace period.
pub async fn serve(
    spec: &ServiceSpec,
    config: &ServiceConfig,
    resources: &Resources,
    routes: Routes,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Install the recorder before the first request records anything.
    metrics::handle();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        services: spec.grpc_services,
    };
    health.set(ServingStatus::NotServing).await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spec.file_descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health_service).add_service(reflection);
    let routes = with_metrics_route(routes, spec, config, resources);
    let known_methods = known_methods(spec)?;

    let (stop_readiness, readiness_stopped) = watch::channel(false);
    let mut readiness = tokio::spawn(readiness(
        spec.migrator,
        config.migrate_on_start,
        config.health_check_interval,
        resources.db.clone(),
        health.clone(),
        readiness_stopped,
    ));
    tokio::spawn(report_redis(resources.redis.clone()));

    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        // HTTP/1.1 too, for `/metrics` on the gRPC port: one port to expose and to scrape.
        .accept_http1(true)
        .layer(grpc::ServerLayer::new(known_methods))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = accepting_stopped.await;
        });
    tokio::pin!(server);
    tokio::pin!(shutdown);

    tokio::select! {
        result = &mut server => {
            readiness.abort();
            result?;
            anyhow::bail!("the gRPC server stopped on its own");
        }
        result = &mut readiness => {
            // Only a fatal start-up error (a migration that cannot apply) ends it early.
            result??;
            anyhow::bail!("the readiness task stopped on its own");
        }
        () = &mut shutdown => {}
    }

    let _ = stop_readiness.send(true);
    let _ = readiness.await;
    health.set(ServingStatus::NotServing).await;
    tracing::info!(
        drain_delay = ?config.shutdown.drain_delay,
        grace_period = ?config.shutdown.grace_period,
        "shutting down: reporting NOT_SERVING"
    );

    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = tokio::time::sleep(config.shutdown.drain_delay) => {}
    }
    let _ = stop_accepting.send(());
    match tokio::time::timeout(config.shutdown.in_flight_deadline(), &mut server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over: cutting the requests still in flight"),
    }
    // Requests cut at the deadline may still hold connections; do not wait on them.
    if tokio::time::timeout(Duration::from_secs(1), resources.db.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections still busy at exit");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Adds `GET /metrics` (Prometheus text) beside the gRPC services. It answers on the gRPC
/// port over HTTP/1.1 (or h2c), so a pod exposes one port and needs no second listener; it
/// samples the pools at each scrape.
fn with_metrics_route(
    routes: Routes,
    spec: &ServiceSpec,
    config: &ServiceConfig,
    resources: &Resources,
) -> Routes {
    let pools = resources.pools(spec, config);
    let scrape = move || {
        pools.sample();
        let body = metrics::render();
        async move { ([(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body) }
    };
    Routes::from(
        routes
            .into_axum_router()
            .route("/metrics", axum::routing::get(scrape)),
    )
}

/// The methods this service answers (its own, health, reflection): the only values the
/// `service` and `method` labels of the RPC metrics take.
fn known_methods(spec: &ServiceSpec) -> anyhow::Result<grpc::KnownMethods> {
    let mut services = spec.grpc_services.to_vec();
    services.extend([
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    ]);
    Ok(grpc::KnownMethods::from_descriptor_sets(
        &[
            spec.file_descriptor_set,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ],
        &services,
    )?)
}

/// Applies migrations, then keeps health in step with the database until told to stop.
async fn readiness(
    migrator: &'static Migrator,
    migrate_on_start: bool,
    interval: Duration,
    db: PgPool,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if migrate_on_start {
        let mut backoff = Duration::from_millis(100);
        loop {
            match postgres::migrate(&db, migrator).await {
                Ok(()) => {
                    tracing::info!("migrations applied");
                    break;
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "database not reachable for migrations");
                }
                Err(e) => return Err(anyhow::Error::new(e).context("applying migrations")),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    let mut serving = None;
    loop {
        let answered = tokio::time::timeout(interval, postgres::ping(&db)).await;
        let now_serving = matches!(answered, Ok(Ok(())));
        if serving != Some(now_serving) {
            if now_serving {
                tracing::info!("database answers: SERVING");
                health.set(ServingStatus::Serving).await;
            } else {
                tracing::warn!(?answered, "database does not answer: NOT_SERVING");
                health.set(ServingStatus::NotServing).await;
            }
            serving = Some(now_serving);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Says once, at start, whether Redis answers. Redis is a cache here: a service serves from
/// Postgres without it, so it does not decide health, but a wrong URL should show at once.
async fn report_redis(redis: RedisPool) {
    match redis_pool::ping(&redis).await {
        Ok(()) => tracing::info!("redis answers"),
        Err(e) => tracing::warn!(error = %e, "redis does not answer; serving without the cache"),
    }
}

/// Errors worth retrying: the database is not there yet, not that a migration is wrong.
fn is_transient(error: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    match error {
        MigrateError::Execute(e) => {
            matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ) || is_startup_database_error(e)
        }
        _ => false,
    }
}

/// `57P03 cannot_connect_now` (the server is starting) and `3D000` (database not yet created).
fn is_startup_database_error(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "57P03" || code == "3D000")
}

/// `<binary> migrate`: applies the migrations once and returns.
pub async fn migrate_once(spec: &ServiceSpec, config: &ServiceConfig) -> anyhow::Result<()> {
    let db = postgres::lazy_pool(&config.postgres, spec.name)?;
    postgres::migrate(&db, spec.migrator).await?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// A gRPC service binary, as the shared `main` sees it. Implemented by each service's config.
pub trait GrpcService: Sized + Send + 'static {
    const SPEC: ServiceSpec;

    fn from_env(env: &Env) -> Self;

    fn service_config(&self) -> &ServiceConfig;

    fn serve(
        self,
        listener: TcpListener,
        shutdown: crate::cli::ShutdownSignal,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The service's own subcommands (see [`crate::cli::Binary::command`]).
    fn command(self, args: &[String]) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        let _ = args;
        None::<std::future::Ready<anyhow::Result<()>>>
    }

    /// Usage lines for [`GrpcService::command`].
    const COMMANDS_USAGE: &'static str = "";
}

impl<S: GrpcService> crate::cli::Binary for S {
    const COMMANDS_USAGE: &'static str = <S as GrpcService>::COMMANDS_USAGE;

    const NAME: &'static str = S::SPEC.name;
    const ENV_PREFIX: &'static str = S::SPEC.env_prefix;

    fn from_env(env: &Env) -> Self {
        <S as GrpcService>::from_env(env)
    }

    fn telemetry(&self) -> &TelemetryConfig {
        &self.service_config().telemetry
    }

    fn listen_addr(&self) -> SocketAddr {
        self.service_config().listen_addr
    }

    fn serve(
        self,
        listener: TcpListener,
        shutdown: crate::cli::ShutdownSignal,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        <S as GrpcService>::serve(self, listener, shutdown)
    }

    fn migrate(self) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        Some(async move { migrate_once(&S::SPEC, self.service_config()).await })
    }

    fn command(self, args: &[String]) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        <S as GrpcService>::command(self, args)
    }
}
