//! The command line: `loadgen list` and `loadgen run`.

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use platform::config::HumanDuration;

use crate::{
    plot,
    report::write_table,
    run::{RunConfig, run},
    scenario::{Accounts, SCENARIOS, Scenario},
    schedule::{Pace, Plan},
    target::Target,
};

const LONG_ABOUT: &str = "\
Drives the public HTTP/JSON API of the gateway (or of any server with the same routes, such
as the Python reference) on loopback, and reports throughput, errors by status and latency
percentiles.

Scenarios that log in need seeded accounts user{i}@example.com (i < --users) sharing one
password. Seed them first with the auth service's own command, with auth's environment
(idempotent; one argon2 hash for all):

    auth seed-users 1000 'correct horse battery staple'

The Python reference seeds its own accounts (PEER_USERS) with the same pattern and password.";

const RUN_AFTER_HELP: &str = "\
Examples:
  loadgen run --scenario login --concurrency 4 --duration 20s
  loadgen run --scenario refresh --rate 500 --duration 30s --plot refresh.png
  loadgen run --scenario profile --target http://127.0.0.1:58000 --json > profile.json";

#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = "Load generator for the HTTP/JSON API", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the scenarios, one per line.
    List,
    /// Run one scenario against a target and report.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Base URL of the target: http:// on 127.0.0.0/8, [::1] or localhost only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Scenario name (`loadgen list`).
    #[arg(long, short)]
    scenario: String,
    /// Open loop: send this many requests per second, whatever the answers do, and measure
    /// each from its due time. Without it the run is closed-loop (maximum throughput).
    #[arg(long)]
    rate: Option<f64>,
    /// Workers, each with one keep-alive connection: the requests in flight (closed loop;
    /// default 8) or the most in flight (open loop; default 64).
    #[arg(long, short)]
    concurrency: Option<usize>,
    /// Measured time after the warm-up (e.g. 500ms, 20s, 2m). Default 10s unless
    /// --requests is given.
    #[arg(long, short, value_parser = duration)]
    duration: Option<Duration>,
    /// Stop after this many measured requests (whichever of this and --duration comes first).
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Load sent before measuring starts (connections and caches warm up).
    #[arg(long, default_value = "2s", value_parser = duration)]
    warmup: Duration,
    /// Seeded accounts to log in as: indexes 0..users of --email.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Email pattern of the seeded accounts; {i} is the account index.
    #[arg(long, default_value = Accounts::DEFAULT_PATTERN)]
    email: String,
    /// Password of every seeded account.
    #[arg(long, default_value = Accounts::DEFAULT_PASSWORD)]
    password: String,
    /// Bound on each request, connecting included.
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Threads of the generator's runtime. One keeps a core free for the server on a small
    /// machine; raise it when the generator is the bottleneck.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the result as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write a PNG: latency by percentile and latency over time.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

fn duration(text: &str) -> Result<Duration, String> {
    text.parse::<HumanDuration>().map(|d| d.0)
}

/// Default workers per loop.
const CLOSED_CONCURRENCY: usize = 8;
const OPEN_CONCURRENCY: usize = 64;
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

impl RunArgs {
    fn into_config(self) -> Result<(RunConfig, Output), String> {
        let target = Target::parse(&self.target).map_err(|e| e.to_string())?;
        let scenario = Scenario::find(&self.scenario).ok_or_else(|| {
            format!(
                "no scenario named `{}`; `loadgen list` shows them",
                self.scenario
            )
        })?;
        let pace = match self.rate {
            None => Pace::Closed,
            Some(rate) if rate.is_finite() && rate > 0.0 && rate <= 1e6 => Pace::Open { rate },
            Some(rate) => {
                return Err(format!(
                    "--rate must be above 0 and at most 1e6, not {rate}"
                ));
            }
        };
        let concurrency = self.concurrency.unwrap_or(match pace {
            Pace::Closed => CLOSED_CONCURRENCY,
            Pace::Open { .. } => OPEN_CONCURRENCY,
        });
        if !(1..=10_000).contains(&concurrency) {
            return Err(format!(
                "--concurrency must be 1 to 10000, not {concurrency}"
            ));
        }
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".to_owned());
        }
        if self.duration == Some(Duration::ZERO) {
            return Err("--duration must be above 0".to_owned());
        }
        let duration = match (self.duration, self.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (duration, _) => duration,
        };
        if self.users == 0 {
            return Err("--users must be at least 1".to_owned());
        }
        if !self.email.contains("{i}") {
            return Err(format!(
                "--email must contain {{i}}, e.g. {}",
                Accounts::DEFAULT_PATTERN
            ));
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be above 0".to_owned());
        }
        if !(1..=64).contains(&self.threads) {
            return Err(format!("--threads must be 1 to 64, not {}", self.threads));
        }
        let config = RunConfig {
            target,
            scenario,
            plan: Plan {
                pace,
                warmup: self.warmup,
                duration,
                requests: self.requests,
            },
            concurrency,
            accounts: Accounts {
                users: self.users,
                email_pattern: self.email,
                password: self.password,
            },
            timeout: self.timeout,
            threads: self.threads,
        };
        Ok((
            config,
            Output {
                json: self.json,
                plot: self.plot,
            },
        ))
    }
}

#[derive(Debug)]
struct Output {
    json: bool,
    plot: Option<PathBuf>,
}

/// Exit status for a bad command line (EX_USAGE), as the services use.
const USAGE: u8 = 64;

/// `loadgen`'s whole life; `main` only calls this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List => list(),
        Command::Run(args) => match args.into_config() {
            Ok((config, output)) => execute(config, output),
            Err(problem) => fail(&problem, USAGE),
        },
    }
}

fn list() -> ExitCode {
    let mut out = std::io::stdout().lock();
    for scenario in SCENARIOS {
        if writeln!(out, "{:<16}{}", scenario.name, scenario.summary).is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn fail(problem: &str, code: u8) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "loadgen: error: {problem}");
    ExitCode::from(code)
}

fn execute(config: RunConfig, output: Output) -> ExitCode {
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), 1),
    };
    let _ = writeln!(std::io::stderr(), "loadgen: {}", describe(&config));
    let analysis = match runtime.block_on(run(config)) {
        Ok(analysis) => analysis,
        Err(e) => return fail(&format!("{e:#}"), 1),
    };
    let mut out = std::io::stdout().lock();
    let written = if output.json {
        serde_json::to_writer_pretty(&mut out, &analysis.report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write_table(&analysis.report, &mut out)
    };
    if let Err(e) = written {
        return fail(&format!("cannot write the report: {e}"), 1);
    }
    if let Some(path) = output.plot {
        if let Err(e) = plot::write_png(&analysis, &path) {
            return fail(&format!("cannot write the plot: {e:#}"), 1);
        }
        let _ = writeln!(
            std::io::stderr(),
            "loadgen: plot written to {}",
            path.display()
        );
    }
    ExitCode::SUCCESS
}

fn describe(config: &RunConfig) -> String {
    let plan = &config.plan;
    let pace = match plan.pace {
        Pace::Closed => format!("closed loop, {} connections", config.concurrency),
        Pace::Open { rate } => format!(
            "open loop at {rate}/s, at most {} connections",
            config.concurrency
        ),
    };
    let bound = match (plan.duration, plan.requests) {
        (Some(d), Some(n)) => format!("{:.1} s or {n} requests", d.as_secs_f64()),
        (Some(d), None) => format!("{:.1} s", d.as_secs_f64()),
        (None, Some(n)) => format!("{n} requests"),
        (None, None) => "unbounded".to_owned(),
    };
    format!(
        "{} against {}: {pace}, {bound} after {:.1} s warm-up",
        config.scenario.name,
        config.target.url,
        plan.warmup.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<(RunConfig, Output), String> {
        let cli = Cli::try_parse_from(["loadgen", "run"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(args) => args.into_config(),
            Command::List => Err("list".to_owned()),
        }
    }

    #[test]
    fn defaults_make_a_bounded_closed_loop_run() {
        let (config, output) = parse(&["--scenario", "login"]).unwrap();
        assert_eq!(config.plan.pace, Pace::Closed);
        assert_eq!(config.concurrency, CLOSED_CONCURRENCY);
        assert_eq!(config.plan.duration, Some(DEFAULT_DURATION));
        assert_eq!(config.plan.warmup, Duration::from_secs(2));
        assert_eq!(config.accounts.email(3), "user3@example.com");
        assert!(!output.json);

        let (config, _) = parse(&[
            "-s", "refresh", "--rate", "500", "-n", "1000", "--warmup", "0s", "--json",
        ])
        .unwrap();
        assert_eq!(config.plan.pace, Pace::Open { rate: 500.0 });
        assert_eq!(config.concurrency, OPEN_CONCURRENCY);
        assert_eq!(
            (config.plan.duration, config.plan.requests),
            (None, Some(1000))
        );
    }

    #[test]
    fn bad_runs_are_refused_with_a_reason() {
        for (args, expected) in [
            (&["-s", "nope"][..], "no scenario named `nope`"),
            (
                &["-s", "login", "--target", "http://10.1.2.3"],
                "not a loopback host",
            ),
            (&["-s", "login", "--rate", "0"], "--rate must be above 0"),
            (&["-s", "login", "-c", "0"], "--concurrency must be 1"),
            (&["-s", "login", "-n", "0"], "--requests must be at least 1"),
            (
                &["-s", "login", "--email", "fixed@example.com"],
                "--email must contain {i}",
            ),
            (&["-s", "login", "--duration", "20"], "no known unit"),
        ] {
            let error = parse(args).err().unwrap();
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }
}
