//! What every binary of the set shares, so learning one binary teaches all four.
//!
//! # Layout

/// Access-token claims and local verification against the published key set.
pub mod access_token;
/// `main` for every binary: settings, telemetry, `serve` / `migrate`.
pub mod cli;
/// Typed settings from prefixed environment variables; every problem reported at once.
pub mod config;
/// Postgres and Redis failures as gRPC statuses; details logged, never returned.
pub mod error;
/// gRPC server spans and lazily connected, trace-carrying client channels.
pub mod grpc;
/// Who is calling: tokens verified locally with auth's keys and revocations; service tokens.
pub mod identity;
/// The global Prometheus recorder behind `/metrics`.
pub mod metrics;
/// The Postgres pool, its knobs, and migrations.
pub mod postgres;
/// The Redis pool (bb8 over multiplexed connections) and its key prefix.
pub mod redis_pool;
/// The life of a gRPC service: health, reflection, readiness, drain.
pub mod service;
/// The shutdown signal and the grace period that bounds the drain.
pub mod shutdown;
/// JSON logs and OpenTelemetry traces.
pub mod telemetry;
/// W3C trace context in HTTP headers and gRPC metadata.
pub mod trace_context;
