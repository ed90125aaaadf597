//! The Postgres pool every service builds the same way, and its migrations.

use std::{str::FromStr, time::Duration};

use sqlx::{
    ConnectOptions, PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::{Env, Secret};

/// Pool settings. Defaults suit one replica on a small machine; the table in the README
/// names the variables (`<PREFIX>_DB_*`).
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `<PREFIX>_DATABASE_URL`, required.
    pub url: Secret,
    /// Upper bound on open connections per replica: replicas × this must stay under the
    /// server's `max_connections` (or the pooler's).
    pub max_connections: u32,
    /// Connections kept open when idle, so the first requests after a quiet spell do not
    /// pay the connect and authentication round trips.
    pub min_connections: u32,
    /// How long a request waits for a free connection before failing with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` close after this long.
    pub idle_timeout: Duration,
    /// Connections are recycled after this long, so server-side memory and fail-overs settle.
    pub max_lifetime: Duration,
    /// Ping each connection before handing it out. Off by default: it costs a round trip per
    /// acquire, and a dead connection already surfaces as a retryable error.
    pub test_before_acquire: bool,
    /// Server-side `statement_timeout`: Postgres itself cancels a statement running longer,
    /// so a runaway query cannot hold a connection however the client behaves.
    pub statement_timeout: Duration,
}

impl PgConfig {
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
    pub const DEFAULT_MIN_CONNECTIONS: u32 = 1;
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

    pub fn from_env(env: &Env) -> Self {
        let config = Self {
            url: env.required("DATABASE_URL"),
            max_connections: env.or("DB_MAX_CONNECTIONS", Self::DEFAULT_MAX_CONNECTIONS),
            min_connections: env.or("DB_MIN_CONNECTIONS", Self::DEFAULT_MIN_CONNECTIONS),
            acquire_timeout: env.duration_or("DB_ACQUIRE_TIMEOUT", Self::DEFAULT_ACQUIRE_TIMEOUT),
            idle_timeout: env.duration_or("DB_IDLE_TIMEOUT", Self::DEFAULT_IDLE_TIMEOUT),
            max_lifetime: env.duration_or("DB_MAX_LIFETIME", Self::DEFAULT_MAX_LIFETIME),
            test_before_acquire: env.or("DB_TEST_BEFORE_ACQUIRE", false),
            statement_timeout: env
                .duration_or("DB_STATEMENT_TIMEOUT", Self::DEFAULT_STATEMENT_TIMEOUT),
        };
        if config.max_connections == 0 {
            env.problem(
                &env.name("DB_MAX_CONNECTIONS"),
                "must be at least 1".to_owned(),
            );
        }
        if config.min_connections > config.max_connections {
            env.problem(
                &env.name("DB_MIN_CONNECTIONS"),
                format!(
                    "{} is above {} ({})",
                    config.min_connections,
                    env.name("DB_MAX_CONNECTIONS"),
                    config.max_connections
                ),
            );
        }
        let url = config.url.expose();
        if !url.is_empty()
            && (!(url.starts_with("postgres://") || url.starts_with("postgresql://"))
                || PgConnectOptions::from_str(url).is_err())
        {
            env.problem(
                &env.name("DATABASE_URL"),
                "is not a valid postgres:// URL".to_owned(),
            );
        }
        config
    }

    /// The same settings pointed at another database of the same server.
    pub fn with_database(&self, database: &str) -> Self {
        let mut url = url_without_database(self.url.expose());
        url.push('/');
        url.push_str(database);
        Self {
            url: Secret::new(url),
            ..self.clone()
        }
    }

    fn connect_options(&self, application_name: &str) -> Result<PgConnectOptions, sqlx::Error> {
        let statement_timeout_ms = self.statement_timeout.as_millis().to_string();
        Ok(PgConnectOptions::from_str(self.url.expose())?
            .application_name(application_name)
            .options([("statement_timeout", statement_timeout_ms.as_str())])
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500)))
    }
}

/// Everything up to the database name, without query parameters.
fn url_without_database(url: &str) -> String {
    let without_query = url.split('?').next().unwrap_or(url);
    match without_query.rfind('/') {
        // `postgres://host/db` — keep everything before the last slash past the scheme.
        Some(i) if i > "postgres://".len() => without_query[..i].to_owned(),
        _ => without_query.to_owned(),
    }
}

/// A pool that connects on first use, so a service starts (and answers health NOT_SERVING)
/// while its database is still coming up.
pub fn lazy_pool(config: &PgConfig, application_name: &str) -> Result<PgPool, sqlx::Error> {
    let options = config.connect_options(application_name)?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .acquire_timeout(config.acquire_timeout)
        .idle_timeout(config.idle_timeout)
        .max_lifetime(config.max_lifetime)
        .test_before_acquire(config.test_before_acquire)
        .connect_lazy_with(options))
}

/// Applies the service's migrations. sqlx holds a Postgres advisory lock while it does, so
/// replicas starting together apply each migration once and the others wait.
pub async fn migrate(
    pool: &PgPool,
    migrator: &Migrator,
) -> Result<(), sqlx::migrate::MigrateError> {
    migrator.run(pool).await
}

/// One round trip that proves the database answers.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(pool).await.map(|_| ())
}

/// A span per SQL statement, as OpenTelemetry's database conventions name them: the
/// statement's summary (the store method, e.g. `auth.credentials`) rather than its text, so
/// no value — and no secret — ever reaches an attribute. A failed statement marks its span
/// as an error.
pub trait StatementSpan: Future + Sized {
    fn statement(self, summary: &'static str) -> impl Future<Output = Self::Output>;
}

impl<F, T> StatementSpan for F
where
    F: Future<Output = Result<T, sqlx::Error>>,
{
    fn statement(self, summary: &'static str) -> impl Future<Output = Self::Output> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "db.statement",
            otel.name = summary,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "postgresql",
            db.query.summary = summary,
            error.type = tracing::field::Empty,
        );
        let recorded = span.clone();
        async move {
            let result = self.instrument(span).await;
            if let Err(error) = &result {
                recorded.record("otel.status_code", "ERROR");
                recorded.record("error.type", sqlx_error_type(error));
            }
            result
        }
    }
}

/// A low-cardinality name for a failure (never its message, which may quote values).
fn sqlx_error_type(error: &sqlx::Error) -> &'static str {
    match error {
        sqlx::Error::Database(_) => "database",
        sqlx::Error::PoolTimedOut => "pool_timed_out",
        sqlx::Error::PoolClosed => "pool_closed",
        sqlx::Error::Io(_) => "io",
        sqlx::Error::RowNotFound => "row_not_found",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_statement_gets_a_client_span_named_by_its_summary_and_failures_mark_it() {
        use opentelemetry::trace::{SpanKind, Status};
        let ((), recorded) = crate::grpc::tests::run(|| async {
            let ok = async { Ok::<u32, sqlx::Error>(1) }
                .statement("auth.credentials")
                .await;
            assert!(ok.is_ok());
            let failed = async { Err::<u32, _>(sqlx::Error::PoolTimedOut) }
                .statement("auth.open_session")
                .await;
            assert!(failed.is_err());
        });
        let span = |name: &str| {
            recorded
                .spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("a span named {name}"))
        };
        let ok = span("auth.credentials");
        assert_eq!(ok.span_kind, SpanKind::Client);
        assert_eq!(ok.status, Status::Unset);
        let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(
            attribute(ok, "db.system.name").as_deref(),
            Some("postgresql")
        );
        let failed = span("auth.open_session");
        assert!(matches!(failed.status, Status::Error { .. }));
        assert_eq!(
            attribute(failed, "error.type").as_deref(),
            Some("pool_timed_out")
        );
    }

    #[test]
    fn swaps_the_database_name() {
        assert_eq!(
            url_without_database("postgres://app:pw@127.0.0.1:55432/postgres?sslmode=disable"),
            "postgres://app:pw@127.0.0.1:55432"
        );
        assert_eq!(
            url_without_database("postgres://127.0.0.1:5432"),
            "postgres://127.0.0.1:5432"
        );
    }

    #[test]
    fn reads_pool_knobs_with_documented_defaults() {
        let env = Env::from_pairs(
            "NOTES",
            [
                ("NOTES_DATABASE_URL", "postgres://app@127.0.0.1:1/notes"),
                ("NOTES_DB_MAX_CONNECTIONS", "4"),
                ("NOTES_DB_STATEMENT_TIMEOUT", "250ms"),
            ],
        );
        let config = PgConfig::from_env(&env);
        assert!(env.finish().is_ok());
        assert_eq!(config.max_connections, 4);
        assert_eq!(config.min_connections, PgConfig::DEFAULT_MIN_CONNECTIONS);
        assert_eq!(config.statement_timeout, Duration::from_millis(250));
        assert!(!config.test_before_acquire);
    }

    #[test]
    fn rejects_a_url_of_another_database() {
        let env = Env::from_pairs(
            "AUTH",
            [("AUTH_DATABASE_URL", "mysql://app@127.0.0.1/auth")],
        );
        let _ = PgConfig::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].variable, "AUTH_DATABASE_URL");
    }

    #[test]
    fn rejects_min_above_max() {
        let env = Env::from_pairs(
            "AUTH",
            [
                ("AUTH_DATABASE_URL", "postgres://app@127.0.0.1:1/auth"),
                ("AUTH_DB_MAX_CONNECTIONS", "2"),
                ("AUTH_DB_MIN_CONNECTIONS", "3"),
            ],
        );
        let _ = PgConfig::from_env(&env);
        let problems = env.finish().err().map(|e| e.problems).unwrap_or_default();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].variable, "AUTH_DB_MIN_CONNECTIONS");
    }
}
