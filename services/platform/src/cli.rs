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
pub trait Binary: Sized + 'static {
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

    /// Subcommands of the binary's own (`args` as given, the name first); `None` when
    /// `args` names none of them.
    fn command(self, args: &[String]) -> Option<impl Future<Output = anyhow::Result<()>> + Send> {
        let _ = args;
        None::<std::future::Ready<anyhow::Result<()>>>
    }

    /// Usage lines for [`Binary::command`]'s subcommands.
    const COMMANDS_USAGE: &'static str = "";
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Serve,
    Migrate,
    /// One of the binary's own subcommands, or nothing it knows.
    Other,
}

fn parse_command(args: &[String]) -> Command {
    match args {
        [] => Command::Serve,
        [one] if one == "serve" => Command::Serve,
        [one] if one == "migrate" => Command::Migrate,
        _ => Command::Other,
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
            "usage: {name} [serve]   serve until SIGTERM/SIGINT\n       {name} migrate   apply migrations and exit\n{extra}\nSettings come from {prefix}_* environment variables (see the README).",
            name = B::NAME,
            prefix = B::ENV_PREFIX,
            extra = B::COMMANDS_USAGE,
        );
        return ExitCode::SUCCESS;
    }
    let command = parse_command(&args);
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
            Some(migrate) => Job::Run(Box::pin(migrate)),
            None => {
                eprintln!("{}: owns no database, so has no `migrate`", B::NAME);
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Command::Other => match config.command(&args) {
            Some(command) => Job::Run(Box::pin(command)),
            None => {
                eprintln!(
                    "{}: unknown arguments {args:?}; try `{} --help`",
                    B::NAME,
                    B::NAME
                );
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
            Job::Run(job) => job.await,
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

/// What `main` runs once the runtime is up: the server, or a command that ends.
enum Job<'a, B> {
    Serve(B),
    Run(Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>),
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
        assert_eq!(parse_command(&args(&[])), Command::Serve);
        assert_eq!(parse_command(&args(&["serve"])), Command::Serve);
        assert_eq!(parse_command(&args(&["migrate"])), Command::Migrate);
        assert_eq!(
            parse_command(&args(&["grant-role", "a@b.c", "admin"])),
            Command::Other
        );
    }
}
