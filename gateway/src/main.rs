//! `gateway`: see the crate docs and the README for settings.

fn main() -> std::process::ExitCode {
    platform::cli::main::<gateway::Config>()
}
