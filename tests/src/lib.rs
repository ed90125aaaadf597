//! The end-to-end harness: starts the real binaries' `serve` functions in-process, on port 0,
//! against the private Postgres and Redis that `./dev test` runs.
//!
//! Isolation: every service of every stack gets a fresh database (`e2e_<pid>_<n>`) and its own
//! Redis key prefix, so tests run in parallel and re-run freely. Databases left by a crashed
//! run are dropped by the next one (their owning pid is gone).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test harness: fail loudly"
)]

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use platform::{config::Env, service::GrpcService};
use sqlx::{Connection as _, PgConnection};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// Where the private instances are, from `./dev test`.
#[derive(Debug, Clone)]
pub struct Infra {
    /// An admin connection URL (database `postgres`) with CREATEDB rights.
    pub database_url: String,
    pub redis_url: String,
}

impl Infra {
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: run the tests with `./dev test` (or `./dev test <filter>`), \
                     which starts the private Postgres and Redis and sets it"
                )
            })
        };
        Self {
            database_url: var("TEST_DATABASE_URL"),
            redis_url: var("TEST_REDIS_URL"),
        }
    }

    /// The server URL with `database` in place of the admin database.
    pub fn url_for(&self, database: &str) -> String {
        let base = self.database_url.split('?').next().unwrap_or_default();
        let cut = base.rfind('/').expect("TEST_DATABASE_URL names a database");
        format!("{}/{database}", &base[..cut])
    }

    async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.database_url)
            .await
            .expect("connect to the private Postgres (is `./dev test` running it?)")
    }

    /// A new, empty database named `e2e_<pid>_<n>_<label>`.
    pub async fn create_database(&self, label: &str) -> String {
        let name = self.database_name(label);
        self.create_named_database(&name).await;
        name
    }

    /// A fresh name that no database has yet (for tests that create it later).
    pub fn database_name(&self, label: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "e2e_{}_{}_{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub async fn create_named_database(&self, name: &str) {
        drop_stale_databases_once(self).await;
        let mut admin = self.admin().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create database {}",
            quote_ident(name)
        )))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    }
}

/// A Postgres identifier, quoted (names come from us or from `pg_database`).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops `e2e_<pid>_*` databases whose process is gone: leftovers of a crashed or killed run.
async fn drop_stale_databases_once(infra: &Infra) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let mut admin = infra.admin().await;
        let names: Vec<String> =
            sqlx::query_scalar("select datname from pg_database where datname like 'e2e\\_%'")
                .fetch_all(&mut admin)
                .await
                .expect("list test databases");
        for name in names {
            let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive =
                pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {} with (force)",
                    quote_ident(&name)
                )))
                .execute(&mut admin)
                .await;
            }
        }
    })
    .await;
}

/// A server task started in-process, stopped by [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts `serve(listener, shutdown)` on an ephemeral loopback port.
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve(listener, shutdown));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Sends the shutdown signal (what SIGTERM does in the binary).
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("valid url")
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect to the in-process server")
    }
}

/// Ed25519 signing keys for tests (PKCS#8 PEM), newest first: tokens are signed with the
/// first, the second stays accepted (a rotation in progress).
pub const TEST_SIGNING_KEYS: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINW6emdA3yU7X9O1bhrYMyFzqj9jgdMVVEBJ7BZsXA9M
-----END PRIVATE KEY-----
-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINAlMk/qQCOLgd0TzPwYz0DCOzcH6kH4Gh/Co+oRYLnl
-----END PRIVATE KEY-----
";

/// The client secret `service` (gateway, profile, notes) obtains service tokens with in
/// tests.
pub fn test_client_secret(service: &str) -> String {
    format!("test-client-secret-{service}-0123456789abcdef0123456789abcdef")
}

/// `AUTH_SERVICE_CLIENTS` for the test secrets: each service's name and secret digest.
pub fn test_service_clients() -> String {
    use sha2::{Digest as _, Sha256};
    ["gateway", "profile", "notes"]
        .map(|service| {
            let digest = Sha256::digest(test_client_secret(service).as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("{service}={hex}")
        })
        .join(",")
}

/// The variables a service reads, pointing at `database` and a private key prefix.
pub fn service_vars(
    infra: &Infra,
    prefix: &str,
    database: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let key_prefix = format!(
        "e2e:{}:{}:",
        uuid::Uuid::new_v4().simple(),
        prefix.to_lowercase()
    );
    let mut vars = vec![
        (format!("{prefix}_DATABASE_URL"), infra.url_for(database)),
        (format!("{prefix}_REDIS_URL"), infra.redis_url.clone()),
        (format!("{prefix}_REDIS_KEY_PREFIX"), key_prefix),
        // Tests notice changes quickly and drain fast.
        (
            format!("{prefix}_HEALTH_CHECK_INTERVAL"),
            "100ms".to_owned(),
        ),
        (format!("{prefix}_SHUTDOWN_DRAIN_DELAY"), "0ms".to_owned()),
        (format!("{prefix}_SHUTDOWN_GRACE_PERIOD"), "5s".to_owned()),
        (format!("{prefix}_DB_MAX_CONNECTIONS"), "4".to_owned()),
        (format!("{prefix}_DB_MIN_CONNECTIONS"), "0".to_owned()),
    ];
    if prefix == "AUTH" {
        vars.extend([
            ("AUTH_SIGNING_KEYS".to_owned(), TEST_SIGNING_KEYS.to_owned()),
            (
                "AUTH_REFRESH_TOKEN_SECRET".to_owned(),
                "test-refresh-secret-0123456789abcdef".to_owned(),
            ),
            // Two grace seconds keep the reuse tests short.
            ("AUTH_REFRESH_GRACE_PERIOD".to_owned(), "2s".to_owned()),
            ("AUTH_SERVICE_CLIENTS".to_owned(), test_service_clients()),
        ]);
    } else {
        vars.push((
            format!("{prefix}_AUTH_CLIENT_SECRET"),
            test_client_secret(&prefix.to_lowercase()),
        ));
    }
    for (name, value) in extra {
        vars.retain(|(n, _)| n != &format!("{prefix}_{name}"));
        vars.push((format!("{prefix}_{name}"), (*value).to_owned()));
    }
    vars
}

/// Builds a service's config exactly as `main` does, from variables.
pub fn service_config<S: GrpcService>(vars: Vec<(String, String)>) -> S {
    let env = Env::from_pairs(S::SPEC.env_prefix, vars);
    let config = S::from_env(&env);
    env.finish().expect("valid test configuration");
    config
}

/// One of the three gRPC services, started on a fresh database.
pub async fn start_service<S: GrpcService + Clone>(
    infra: &Infra,
    extra: &[(&str, &str)],
) -> Running {
    start_service_with_config::<S>(infra, extra).await.1
}

/// [`start_service`], also returning the configuration it started with (to run the
/// binary's commands, such as `auth grant-role`, against the same database).
pub async fn start_service_with_config<S: GrpcService + Clone>(
    infra: &Infra,
    extra: &[(&str, &str)],
) -> (S, Running) {
    let database = infra.create_database(S::SPEC.name).await;
    let vars = service_vars(infra, S::SPEC.env_prefix, &database, extra);
    let config: S = service_config(vars);
    let serving = config.clone();
    let running = Running::start(move |listener, shutdown| serving.serve(listener, shutdown)).await;
    (config, running)
}

/// The whole set: three services and the gateway in front of them. With `E2E_REPLICAS=2`
/// (or [`Stack::start_replicated`]) every service runs as several replicas sharing their
/// database and Redis keys, and the gateway balances over them: the suite's "two replicas
/// of everything" mode.
#[derive(Debug)]
pub struct Stack {
    /// The auth service's configuration, for `auth` commands against its database.
    pub auth_config: auth::Config,
    /// The first replica of each service.
    pub auth: Running,
    pub profile: Running,
    pub notes: Running,
    pub gateway: Running,
    /// The other replicas, by service name (`auth`, `profile`, `notes`).
    pub replicas: Vec<(&'static str, Running)>,
}

/// Replicas per service for [`Stack::start`]: `E2E_REPLICAS`, default 1.
fn replicas_from_env() -> usize {
    std::env::var("E2E_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// `replicas` instances of one service on one fresh database and one key prefix, each with
/// its own `<P>_INSTANCE_ID` (`auth-0`, `auth-1`, …).
async fn start_replicas<S: GrpcService + Clone>(
    infra: &Infra,
    replicas: usize,
    extra: &[(&str, &str)],
) -> (S, Vec<Running>) {
    let database = infra.create_database(S::SPEC.name).await;
    let vars = service_vars(infra, S::SPEC.env_prefix, &database, extra);
    let mut first_config = None;
    let mut running = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let mut vars = vars.clone();
        vars.push((
            format!("{}_INSTANCE_ID", S::SPEC.env_prefix),
            format!("{}-{i}", S::SPEC.name),
        ));
        let config: S = service_config(vars);
        first_config.get_or_insert_with(|| config.clone());
        running
            .push(Running::start(move |listener, shutdown| config.serve(listener, shutdown)).await);
    }
    (first_config.expect("at least one replica"), running)
}

/// The URLs of every replica, comma-separated (what a channel balances over).
fn urls(replicas: &[Running]) -> String {
    replicas
        .iter()
        .map(Running::url)
        .collect::<Vec<_>>()
        .join(",")
}

impl Stack {
    pub async fn start(infra: &Infra) -> Self {
        Self::start_with(infra, &[]).await
    }

    /// The set with `AUTH_<name>` overrides for the auth service.
    pub async fn start_with(infra: &Infra, auth_extra: &[(&str, &str)]) -> Self {
        Self::start_replicated_with(infra, replicas_from_env(), auth_extra, &[]).await
    }

    /// `replicas` replicas of every service behind one gateway.
    pub async fn start_replicated(infra: &Infra, replicas: usize) -> Self {
        Self::start_replicated_with(infra, replicas, &[], &[]).await
    }

    /// The set with `AUTH_<name>` overrides for auth and `<P>_<name>` overrides for every
    /// service (`SHUTDOWN_DRAIN_DELAY`, say).
    pub async fn start_replicated_with(
        infra: &Infra,
        replicas: usize,
        auth_extra: &[(&str, &str)],
        every_service: &[(&str, &str)],
    ) -> Self {
        let replicas = replicas.max(1);
        // Auth first: the others are told where it listens.
        let mut auth_vars = every_service.to_vec();
        auth_vars.extend_from_slice(auth_extra);
        let (auth_config, mut auths) =
            start_replicas::<auth::Config>(infra, replicas, &auth_vars).await;
        let auth_url = urls(&auths);
        let mut with_auth = every_service.to_vec();
        with_auth.push(("AUTH_URL", auth_url.as_str()));
        // Profile before notes: notes asks profile for plans (binding a port is all
        // "started" takes here, so this costs nothing).
        let (_, mut profiles) =
            start_replicas::<profile::Config>(infra, replicas, &with_auth).await;
        let profile_url = urls(&profiles);
        let mut with_auth_and_profile = with_auth.clone();
        with_auth_and_profile.push(("PROFILE_URL", profile_url.as_str()));
        let (_, mut notes) =
            start_replicas::<notes::Config>(infra, replicas, &with_auth_and_profile).await;
        let gateway = start_gateway(&[
            ("AUTH_URL", &auth_url),
            ("PROFILE_URL", &urls(&profiles)),
            ("NOTES_URL", &urls(&notes)),
        ])
        .await;
        let (auth, profile, note) = (auths.remove(0), profiles.remove(0), notes.remove(0));
        let replicas = auths
            .into_iter()
            .map(|r| ("auth", r))
            .chain(profiles.into_iter().map(|r| ("profile", r)))
            .chain(notes.into_iter().map(|r| ("notes", r)))
            .collect();
        Self {
            auth_config,
            auth,
            profile,
            notes: note,
            gateway,
            replicas,
        }
    }

    pub fn services(&self) -> [(&'static str, &Running); 3] {
        [
            ("auth.v1.AuthService", &self.auth),
            ("profile.v1.ProfileService", &self.profile),
            ("notes.v1.NotesService", &self.notes),
        ]
    }

    /// Stops everything and checks each part exited cleanly.
    pub async fn stop(self) {
        let Self {
            auth,
            profile,
            notes,
            gateway,
            replicas,
            ..
        } = self;
        let mut all: Vec<Running> = vec![gateway, auth, profile, notes];
        all.extend(replicas.into_iter().map(|(_, r)| r));
        for running in &mut all {
            running.signal_shutdown();
        }
        for running in all {
            tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .expect("stops within its grace period")
                .expect("task did not panic")
                .expect("serve returned Ok");
        }
    }
}

/// The gateway with `GATEWAY_<name>` overrides.
pub async fn start_gateway(extra: &[(&str, &str)]) -> Running {
    let config = gateway_config(extra);
    Running::start(move |listener, shutdown| gateway::serve(config, listener, shutdown)).await
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, Fut>(within: Duration, what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET http://<addr><path>` over a fresh HTTP/1.1 connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], Vec::new()).await
}

/// Installs the process-wide tracing subscriber and tracer provider `main` installs (nothing
/// exported), so spans get trace ids as in production. Once per test process; later calls
/// do nothing. Logs go nowhere unless `TEST_LOG` is set (then to stdout).
pub fn install_tracing() {
    static GUARD: std::sync::OnceLock<platform::telemetry::TelemetryGuard> =
        std::sync::OnceLock::new();
    GUARD.get_or_init(|| {
        let config = platform::telemetry::TelemetryConfig {
            service_name: "e2e",
            instance_id: format!("e2e-{}", std::process::id()),
            log_format: platform::telemetry::LogFormat::Json,
            log_filter: platform::telemetry::TelemetryConfig::DEFAULT_LOG_FILTER.to_owned(),
            otlp_endpoint: None,
            sample_ratio: 1.0,
        };
        let installed = if std::env::var_os("TEST_LOG").is_some() {
            platform::telemetry::init_with_writer(&config, std::io::stdout)
        } else {
            platform::telemetry::init_with_writer(&config, std::io::sink)
        };
        installed.expect("the only global subscriber of the test process")
    });
}

/// Sends one unary gRPC call with an empty message to `path` (`/package.Service/Method`),
/// with `metadata`, and returns the response headers and the status code, from the headers
/// (trailers-only answers) or else the trailers.
pub async fn grpc_call_raw(
    running: &Running,
    path: &str,
    metadata: &[(&str, &str)],
) -> (http::HeaderMap, tonic::Code) {
    use http_body_util::BodyExt as _;
    use tonic::codegen::Service as _;

    let mut channel = running.channel().await;
    // An empty message: no compression flag, zero length.
    let body = http_body_util::Full::new(hyper::body::Bytes::from_static(&[0, 0, 0, 0, 0]));
    let mut request = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .expect("valid request");
    for (name, value) in metadata {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("metadata name"),
            http::HeaderValue::from_str(value).expect("metadata value"),
        );
    }
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("channel ready");
    let response = tokio::time::timeout(Duration::from_secs(10), channel.call(request))
        .await
        .expect("answer within 10s")
        .expect("gRPC response");
    let (parts, body) = response.into_parts();
    let code_in = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| tonic::Code::from_bytes(v.as_bytes()))
    };
    let code = match code_in(&parts.headers) {
        Some(code) => code,
        None => {
            let collected = body.collect().await.expect("read the body");
            collected
                .trailers()
                .and_then(code_in)
                .expect("grpc-status in the trailers")
        }
    };
    (parts.headers, code)
}

/// The value of the sample `series` (name and labels exactly as rendered) in a Prometheus
/// text exposition, 0 when absent.
pub fn prometheus_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The gateway's configuration with `GATEWAY_<name>` overrides, on the defaults
/// [`start_gateway`] uses.
pub fn gateway_config(extra: &[(&str, &str)]) -> gateway::Config {
    let mut vars = vec![
        ("GATEWAY_SHUTDOWN_DRAIN_DELAY".to_owned(), "0ms".to_owned()),
        ("GATEWAY_SHUTDOWN_GRACE_PERIOD".to_owned(), "5s".to_owned()),
        (
            "GATEWAY_AUTH_CLIENT_SECRET".to_owned(),
            test_client_secret("gateway"),
        ),
        ("GATEWAY_REDIS_URL".to_owned(), Infra::from_env().redis_url),
        // Each gateway its own keys, so tests never share rate-limit state by accident.
        (
            "GATEWAY_REDIS_KEY_PREFIX".to_owned(),
            format!("e2e:{}:gateway:", uuid::Uuid::new_v4().simple()),
        ),
        // Tests log in far more often than people; the rate-limit tests set tiers themselves.
        ("GATEWAY_RATE_LIMIT_SCALE".to_owned(), "1000".to_owned()),
    ];
    vars.extend(
        extra
            .iter()
            .map(|(name, value)| (format!("GATEWAY_{name}"), (*value).to_owned())),
    );
    let env = Env::from_pairs("GATEWAY", vars);
    let config = gateway::Config::from_env(&env);
    env.finish().expect("valid gateway configuration");
    config
}

/// The gateway with a test's own API routes mounted behind the same edge guard and
/// middleware as the real ones.
pub async fn start_gateway_with_routes(
    extra: &[(&str, &str)],
    routes: axum::Router<gateway::AppState>,
) -> Running {
    let config = gateway_config(extra);
    Running::start(move |listener, shutdown| {
        gateway::serve_with(config, routes, listener, shutdown)
    })
    .await
}

/// Any request over a fresh HTTP/1.1 connection. Header values go out as raw bytes, so a
/// test can send what a lenient client would (tabs, UTF-8).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Vec<u8>>,
) -> HttpResponse {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(
            *name,
            http::HeaderValue::from_bytes(value.as_bytes()).expect("a header value"),
        );
    }
    let request = request
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.into(),
        )))
        .expect("a valid request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("response within 10s")
        .expect("HTTP request");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read body").to_bytes().to_vec();
    HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}
