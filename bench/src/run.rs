//! A run: set-up (every worker connects, and logs in when the scenario needs tokens), then
//! the workers drive the schedule until it ends, then their records are merged.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    http::{Connection, TransportError},
    progress::{self, Progress},
    record::{Live, Record, Timing, op_index},
    report::{Analysis, RunInfo, analyse},
    scenario::{Accounts, Op, Outcome, Scenario, VirtualUser},
    schedule::{Pace, Plan, Schedule},
    target::Target,
};

/// Everything a run needs, checked by the command line.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    pub scenario: &'static Scenario,
    pub plan: Plan,
    /// Workers, each with its own connection.
    pub concurrency: usize,
    pub accounts: Accounts,
    /// Bound on each request, connection included.
    pub timeout: Duration,
    /// The generator runtime's threads, for the report.
    pub threads: usize,
}

/// Set-up logins at once: auth refuses logins past its hash queue (8 per hash worker by
/// default), so set-up stays well inside it.
const SETUP_PARALLELISM: usize = 4;
const SETUP_ATTEMPTS: u32 = 6;

/// What all workers share.
#[derive(Debug)]
struct Shared {
    config: RunConfig,
    ops: Vec<Op>,
    /// Request paths by op index, base path included.
    paths: Vec<String>,
    schedule: Schedule,
    live: Arc<Live>,
}

#[derive(Debug)]
struct Worker {
    id: usize,
    connection: Connection,
    user: VirtualUser,
}

/// Runs the scenario and returns its analysis.
pub async fn run(config: RunConfig) -> anyhow::Result<Analysis> {
    let addr = config.target.resolve().await?;
    let workers = set_up(&config, addr).await?;
    let ops = config.scenario.ops();
    let paths = ops.iter().map(|op| config.target.path(op.path())).collect();
    let live = Arc::new(Live::default());
    let shared = Arc::new(Shared {
        schedule: Schedule::new(config.plan, Instant::now()),
        config,
        ops,
        paths,
        live: live.clone(),
    });
    let plan = shared.schedule.plan();
    let progress = Progress::start(
        live,
        progress::Bounds {
            measure_start: shared.schedule.measure_start(),
            warmup: plan.warmup,
            duration: plan.duration,
            requests: plan.requests,
        },
    );
    let mut running = JoinSet::new();
    for worker in workers {
        running.spawn(drive(worker, shared.clone()));
    }
    let mut record = Record::default();
    while let Some(done) = running.join_next().await {
        record = record.merge(done.context("a worker failed")?);
    }
    progress.finish().await;

    let measured = record.last_done.map_or(Duration::ZERO, |done| {
        done.saturating_duration_since(shared.schedule.measure_start())
    });
    let config = &shared.config;
    let info = RunInfo {
        target: config.target.url.clone(),
        scenario: config.scenario.name,
        mode: match config.plan.pace {
            Pace::Closed => "closed",
            Pace::Open { .. } => "open",
        },
        concurrency: config.concurrency,
        rate: match config.plan.pace {
            Pace::Closed => None,
            Pace::Open { rate } => Some(rate),
        },
        users: config.accounts.users,
        threads: config.threads,
        warmup_s: config.plan.warmup.as_secs_f64(),
    };
    let names: Vec<&'static str> = shared.ops.iter().map(|op| op.name()).collect();
    Ok(analyse(info, &names, &record, measured)?)
}

/// Connects every worker and, when the scenario needs tokens, logs each in, a few at a
/// time. Fails with advice when the target cannot be reached or refuses the accounts.
async fn set_up(config: &RunConfig, addr: SocketAddr) -> anyhow::Result<Vec<Worker>> {
    let permits = Arc::new(Semaphore::new(SETUP_PARALLELISM));
    let mut pending = JoinSet::new();
    for id in 0..config.concurrency {
        let permits = permits.clone();
        let config = config.clone();
        pending.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let mut worker = Worker {
                id,
                connection: Connection::new(addr, &config.target.authority, config.timeout)?,
                user: VirtualUser::new(id, config.concurrency),
            };
            worker.connection.connect().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach {} ({}): is it running?",
                    config.target.url,
                    e.name()
                )
            })?;
            if config.scenario.logs_in_first() {
                set_up_login(&mut worker, &config).await?;
            }
            anyhow::Ok(worker)
        });
    }
    let mut workers = Vec::with_capacity(config.concurrency);
    while let Some(done) = pending.join_next().await {
        workers.push(done.context("set-up failed")??);
    }
    workers.sort_by_key(|w| w.id);
    Ok(workers)
}

/// One login before the clock starts, retried while the target says it is busy.
async fn set_up_login(worker: &mut Worker, config: &RunConfig) -> anyhow::Result<()> {
    let path = config.target.path(Op::Login.path());
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=SETUP_ATTEMPTS {
        let email = config
            .accounts
            .email(worker.user.next_account(&config.accounts));
        match login(worker, &config.accounts, &path).await {
            Outcome::Ok => return Ok(()),
            Outcome::Status(429 | 503) | Outcome::Transport(TransportError::Timeout)
                if attempt < SETUP_ATTEMPTS =>
            {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Outcome::Status(status @ (400 | 401 | 404)) => anyhow::bail!(
                "set-up: logging in as {email} got HTTP {status}. Are the accounts seeded? \
                 Seed {users} with `auth seed-users {users} '{password}'` \
                 (or pass --users, --email and --password to match the target's accounts)",
                users = config.accounts.users,
                password = config.accounts.password,
            ),
            other => anyhow::bail!("set-up: logging in as {email} failed: {}", other.key()),
        }
    }
    anyhow::bail!("set-up: the target stayed busy through {SETUP_ATTEMPTS} login attempts")
}

async fn login(worker: &mut Worker, accounts: &Accounts, path: &str) -> Outcome {
    let call = worker.user.call(Op::Login, accounts);
    let result = worker
        .connection
        .send(call.method, path, None, call.json)
        .await;
    worker.user.absorb(Op::Login, &result, Instant::now())
}

/// One worker: takes tickets until the schedule ends, sending the scenario's cycle.
async fn drive(mut worker: Worker, shared: Arc<Shared>) -> Record {
    let cycle = shared.config.scenario.cycle;
    let accounts = &shared.config.accounts;
    let measure_start = shared.schedule.measure_start();
    let login_path = shared.config.target.path(Op::Login.path());
    // Workers start at different places in a mixed cycle, so the mix holds at every moment.
    let mut position = worker.id % cycle.len();
    let mut record = Record::default();
    loop {
        let op = cycle[position];
        position = (position + 1) % cycle.len();
        if worker.user.needs_login(op, Instant::now()) {
            // Off the clock: a token lost to an error, or one about to expire.
            login(&mut worker, accounts, &login_path).await;
        }
        let ready = Instant::now();
        let Some(ticket) = shared.schedule.next(ready) else {
            break;
        };
        if ticket.due > Instant::now() {
            // Only when due later: even a sleep that is already over waits for the timer's
            // next tick (a millisecond), which would cap a closed loop at ~1,000/s a worker.
            tokio::time::sleep_until(ticket.due.into()).await;
        }
        let index = op_index(&shared.ops, op);
        let call = worker.user.call(op, accounts);
        let sent = Instant::now();
        let result = worker
            .connection
            .send(
                call.method,
                &shared.paths[usize::from(index)],
                call.bearer.as_deref(),
                call.json,
            )
            .await;
        let done = Instant::now();
        let outcome = worker.user.absorb(op, &result, done);
        shared.live.count(ticket.measured, outcome.is_ok());
        if ticket.measured {
            let timing = Timing {
                due: ticket.due,
                ready,
                sent,
                done,
            };
            record.add(index, outcome, measure_start, timing);
        }
    }
    record
}
