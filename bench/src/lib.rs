//! `loadgen`: a load generator for the HTTP/JSON contract of the gateway, or of any server
//! with the same routes (the Python reference in `../shared/peers/fastapi` included), on
//! loopback only.
//!
//! Open-loop runs send at a fixed rate and measure each request from its *intended* send
//! time, so a slow server cannot hide its queueing by slowing the generator down
//! (coordinated omission). Closed-loop runs keep a fixed number of requests in flight for
//! maximum throughput. Every worker owns one HTTP/1.1 keep-alive connection.
//!
//! # Layout

/// The command line: `loadgen run`, `loadgen list`.
pub mod cli;
/// One keep-alive HTTP/1.1 connection per worker, over hyper.
pub mod http;
/// The PNG: percentile curve and latency over time.
pub mod plot;
/// The live progress line on stderr.
pub mod progress;
/// What each worker records, and the merge of all workers' records.
pub mod record;
/// Percentiles, the table for people and the JSON for machines.
pub mod report;
/// Workers, set-up and the run itself.
pub mod run;
/// The scenarios, their requests and the virtual users' tokens.
pub mod scenario;
/// When each request is due: open-loop tickets, closed-loop bounds, warm-up.
pub mod schedule;
/// The target's base URL, refused unless it is on loopback.
pub mod target;
