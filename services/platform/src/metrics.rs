//! The process-wide Prometheus recorder behind every binary's `/metrics`, the names and help
//! texts of the metrics this crate records, and the pool gauges sampled at scrape time.
//!
//! `docs/operations.md` explains each metric for the people who run the set.

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use sqlx::PgPool;

use crate::redis_pool::RedisPool;

/// Latency buckets in seconds, from sub-millisecond cache hits to the multi-second tail that
/// alerting cares about.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// A recorder with the set's histogram buckets; every `*_seconds` histogram gets them.
pub(crate) fn build_recorder() -> PrometheusRecorder {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS);
    // Only an empty bucket list is rejected, and ours is a non-empty constant.
    let builder = match builder {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    };
    builder.build_recorder()
}

/// The global recorder's handle, installing the recorder on first use. Several binaries
/// started in one test process share it, which is harmless: each renders the same registry.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// `# HELP` lines for the metrics this crate records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "rpc_server_requests_total",
        Unit::Count,
        "gRPC calls served, by rpc service, method and status code"
    );
    describe_histogram!(
        "rpc_server_duration_seconds",
        Unit::Seconds,
        "Time from a gRPC call's arrival to its status (end of stream for streams)"
    );
    describe_counter!(
        "rpc_client_requests_total",
        Unit::Count,
        "gRPC calls made to other services, by rpc service, method and status code"
    );
    describe_histogram!(
        "rpc_client_duration_seconds",
        Unit::Seconds,
        "Time from sending a gRPC call to its status"
    );
    describe_gauge!(
        "db_pool_connections",
        Unit::Count,
        "Open Postgres connections of the pool, by state (idle, in_use)"
    );
    describe_gauge!(
        "db_pool_max_connections",
        Unit::Count,
        "Upper bound of the Postgres pool (<PREFIX>_DB_MAX_CONNECTIONS)"
    );
    describe_gauge!(
        "redis_pool_connections",
        Unit::Count,
        "Open Redis connections of the pool, by state (idle, in_use)"
    );
    describe_gauge!(
        "redis_pool_max_connections",
        Unit::Count,
        "Upper bound of the Redis pool (<PREFIX>_REDIS_MAX_CONNECTIONS)"
    );
    describe_gauge!(
        "redis_pool_pending_gets",
        Unit::Count,
        "Requests waiting for a Redis connection right now"
    );
    describe_counter!(
        "redis_pool_gets_total",
        Unit::Count,
        "Redis connection checkouts, by result: direct (one was free), waited, timed_out"
    );
    describe_gauge!(
        "redis_pool_get_wait_seconds",
        Unit::Seconds,
        "Cumulative time checkouts spent waiting for a Redis connection since start (only grows: use rate())"
    );
    describe_counter!(
        "redis_pool_connections_created_total",
        Unit::Count,
        "Redis connections opened since start"
    );
    describe_counter!(
        "redis_pool_connections_closed_total",
        Unit::Count,
        "Redis connections closed since start, by reason (broken, invalid, max_lifetime, idle_timeout)"
    );
}

/// The pools a service's `/metrics` reports, sampled when it is scraped: pools keep their
/// own counts, so reading them on demand is exact and costs nothing between scrapes.
#[derive(Debug, Clone)]
pub struct Pools {
    /// The `service` label: `auth`, `profile`, `notes`.
    pub service: &'static str,
    pub db: PgPool,
    pub redis: RedisPool,
    /// bb8 does not report its bound; the service passes its setting.
    pub redis_max_connections: u32,
}

/// One pool's state at a moment, for the admin pool-status view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFigures {
    /// `postgres` or `redis`.
    pub name: &'static str,
    pub max_size: u32,
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    /// Tasks waiting for a connection. sqlx does not report its waiters, so Postgres shows 0
    /// (a pool at its bound with no idle connection is the sign of waiting there).
    pub waiters: u32,
}

impl Pools {
    /// Both pools as they are now.
    pub fn figures(&self) -> [PoolFigures; 2] {
        let size = self.db.size();
        let idle = u32::try_from(self.db.num_idle())
            .unwrap_or(u32::MAX)
            .min(size);
        let state = self.redis.state();
        let redis_idle = state.idle_connections.min(state.connections);
        [
            PoolFigures {
                name: "postgres",
                max_size: self.db.options().get_max_connections(),
                size,
                idle,
                in_use: size - idle,
                waiters: 0,
            },
            PoolFigures {
                name: "redis",
                max_size: self.redis_max_connections,
                size: state.connections,
                idle: redis_idle,
                in_use: state.connections - redis_idle,
                waiters: u32::try_from(state.statistics.pending_gets()).unwrap_or(u32::MAX),
            },
        ]
    }

    /// Sets the pool gauges and counters to the pools' current state.
    pub fn sample(&self) {
        let service = self.service;

        let size = self.db.size();
        let idle = u32::try_from(self.db.num_idle())
            .unwrap_or(u32::MAX)
            .min(size);
        metrics::gauge!("db_pool_connections", "service" => service, "state" => "idle").set(idle);
        metrics::gauge!("db_pool_connections", "service" => service, "state" => "in_use")
            .set(size - idle);
        metrics::gauge!("db_pool_max_connections", "service" => service)
            .set(self.db.options().get_max_connections());

        let state = self.redis.state();
        let idle = state.idle_connections.min(state.connections);
        metrics::gauge!("redis_pool_connections", "service" => service, "state" => "idle")
            .set(idle);
        metrics::gauge!("redis_pool_connections", "service" => service, "state" => "in_use")
            .set(state.connections - idle);
        metrics::gauge!("redis_pool_max_connections", "service" => service)
            .set(self.redis_max_connections);
        let stats = &state.statistics;
        // Precision loss only past 2^53 waiting checkouts.
        metrics::gauge!("redis_pool_pending_gets", "service" => service)
            .set(stats.pending_gets() as f64);
        for (result, count) in [
            ("direct", stats.get_direct),
            ("waited", stats.get_waited),
            ("timed_out", stats.get_timed_out),
        ] {
            metrics::counter!("redis_pool_gets_total", "service" => service, "result" => result)
                .absolute(count);
        }
        metrics::gauge!("redis_pool_get_wait_seconds", "service" => service)
            .set(stats.get_wait_time.as_secs_f64());
        metrics::counter!("redis_pool_connections_created_total", "service" => service)
            .absolute(stats.connections_created);
        for (reason, count) in [
            ("broken", stats.connections_closed_broken),
            ("invalid", stats.connections_closed_invalid),
            ("max_lifetime", stats.connections_closed_max_lifetime),
            ("idle_timeout", stats.connections_closed_idle_timeout),
        ] {
            metrics::counter!(
                "redis_pool_connections_closed_total",
                "service" => service,
                "reason" => reason,
            )
            .absolute(count);
        }
    }
}
