//! The `main` every binary shares: read settings, set up telemetry, run a subcommand.
//!
//! ```text
//! <binary> [serve]    serve until SIGTERM/SIGINT (the default)
//! <binary> migrate    apply the database migrations and exit (services only)
//! ```

use std::{future::Future, net::SocketAddr, pin::Pin, process::ExitCode};

use tokio::net::TcpListener;

use crate::{
    config::{EXIT_USAGE, Env},
    shutdown,
    telemetry::{self, TelemetryConfig},
};

/// A future that resolves when the binary should start shutting down.
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a binary tells the shared `main` about itself. Implemented by its config type.
pub trait Binary: Sized {
    const NAME: &'static str;
    const ENV_PREFIX: &'static str;

    /// Reads the settings; problems are recorded in `env` and reported together.
    fn from_env(env: &Env) -> Self;

    fn telemetry(&self) -> &TelemetryConfig;

    fn listen_addr(&self) -> SocketAddr;

    fn serve(
        self,
        listener: TcpListener,
        shutdown: ShutdownSignal,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The `migrate` subcommand; `None` for a binary that owns no database.
    fn migrate(self) -> Option<impl Future<Output = anyhow::Result<()>> + Send>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Serve,
    Migrate,
}

fn parse_command(args: &[String]) -> Result<Command, String> {
    match args {
        [] => Ok(Command::Serve),
        [one] if one == "serve" => Ok(Command::Serve),
        [one] if one == "migrate" => Ok(Command::Migrate),
        other => Err(format!("unknown arguments {other:?}")),
    }
}

/// Runs the binary `B` from the process arguments and environment.
#[allow(
    clippy::print_stderr,
    reason = "before telemetry is up, stderr is the only channel"
)]
pub fn main<B: Binary>() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.as_slice(), [one] if one == "--help" || one == "-h" || one == "help") {
        eprintln!(
            "usage: {name} [serve]   serve until SIGTERM/SIGINT\n       {name} migrate   apply migrations and exit\n\nSettings come from {prefix}_* environment variables (see the README).",
            name = B::NAME,
            prefix = B::ENV_PREFIX
        );
        return ExitCode::SUCCESS;
    }
    let command = match parse_command(&args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("{}: {e}; try `{} --help`", B::NAME, B::NAME);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let env = Env::from_process(B::ENV_PREFIX);
    let config = B::from_env(&env);
    if let Err(e) = env.finish() {
        eprintln!("{}: {e}", B::NAME);
        return ExitCode::from(EXIT_USAGE);
    }

    let telemetry = config.telemetry().clone();
    let listen_addr = config.listen_addr();
    let job = match command {
        Command::Serve => Job::Serve(config),
        Command::Migrate => match config.migrate() {
            Some(migrate) => Job::Migrate(migrate),
            None => {
                eprintln!("{}: owns no database, so has no `migrate`", B::NAME);
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", B::NAME);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let _telemetry = telemetry::init(&telemetry)?;
        let result = match job {
            Job::Serve(config) => serve(config, listen_addr).await,
            Job::Migrate(migrate) => migrate.await,
        };
        result.inspect_err(|e| tracing::error!(error = format!("{e:#}"), "exiting on error"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", B::NAME);
            ExitCode::FAILURE
        }
    }
}

enum Job<B, M> {
    Serve(B),
    Migrate(M),
}

async fn serve<B: Binary>(config: B, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "listening");
    config.serve(listener, Box::pin(shutdown::signal())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subcommands() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(parse_command(&args(&[])), Ok(Command::Serve));
        assert_eq!(parse_command(&args(&["serve"])), Ok(Command::Serve));
        assert_eq!(parse_command(&args(&["migrate"])), Ok(Command::Migrate));
        assert!(parse_command(&args(&["migrate", "now"])).is_err());
        assert!(parse_command(&args(&["serv"])).is_err());
    }
}
