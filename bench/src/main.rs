//! `loadgen`: see the library's documentation and `loadgen --help`.

fn main() -> std::process::ExitCode {
    bench::cli::main()
}
