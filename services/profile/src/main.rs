//! `profile`: see the crate docs and the README for settings and subcommands.

fn main() -> std::process::ExitCode {
    platform::cli::main::<profile::Config>()
}
