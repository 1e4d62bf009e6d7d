//! `cargo xtask`: pymem's developer workflows (setup, tests, running the
//! agent, test root filesystems and benchmarks) as one Rust program, so that
//! CI and developers run exactly the same steps.
mod bench;
mod dev;
mod fuzz;
mod process;
mod rootfs;
mod setup;
mod support;
mod workspace;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "pymem developer workflows"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what builds and tests need (idempotent; fast when done).
    Setup,
    /// Run setup, `cargo test --workspace` as root, then each fuzz target briefly.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run setup, build the release agent and run `pymem agent` as root.
    Agent {
        /// Arguments for `pymem agent` (after `--`).
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Build a Debian root filesystem under .cache/rootfs/ and print its path.
    Rootfs {
        #[arg(value_enum)]
        suite: rootfs::SuiteArg,
    },
    /// Benchmarks of the agent's cost.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the fuzz targets of fuzz/ (cargo-fuzz on the pinned nightly).
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets run at once (default: one per CPU).
        #[arg(long, default_value_t = fuzz::default_jobs())]
        jobs: usize,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Rewrite README.md's support table from the results in target/support/.
    SupportTable,
    /// Rewrite README.md's performance section from target/bench/peers.json.
    PerfTable,
}

fn main() -> ExitCode {
    workspace::put_cargo_bin_on_path();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Failures here are messages for the user, not bugs: no backtrace
            // even when RUST_BACKTRACE is set.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Setup => setup::run(),
        Command::Test { cargo_args } => dev::test(&cargo_args),
        Command::Agent { agent_args } => dev::agent(&agent_args),
        Command::Rootfs { suite } => rootfs::run(suite),
        Command::Bench(command) => bench::run(command),
        Command::Fuzz {
            seconds,
            jobs,
            targets,
        } => fuzz::run(seconds, jobs, &targets),
        Command::SupportTable => support::run(),
        Command::PerfTable => bench::update_readme(),
    }
}
