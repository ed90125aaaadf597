//! End-to-end tests: the whole set in-process against the private Postgres and Redis.
//! Run with `./dev test` (all) or `./dev test <filter>` (some).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: fail loudly"
)]

mod auth;
mod balance;
mod gateway_auth;
mod gateway_edge;
mod idempotency;
mod identity;
mod jobs;
mod lifecycle;
mod notes;
mod observability;
mod openapi;
mod pools;
mod profile;
mod rate_limits;
mod replicas;
mod route_classes;
mod stack;
