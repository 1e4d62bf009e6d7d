//! `cargo xtask test` and `cargo xtask agent`.
use std::{env, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, ensure};

use crate::{fuzz, process, setup, support, workspace};

/// Runs the whole test suite, then each fuzz target briefly; fails (with
/// cargo's status when the tests failed) so CI sees it.
pub fn test(cargo_args: &[String]) -> Result<()> {
    ensure!(
        process::is_root(),
        "the tests load BPF programs and must run as root (try `sudo -E cargo xtask test`)"
    );
    setup::run()?;
    let mut cargo_test = workspace::cargo();
    cargo_test.args(["test", "--workspace"]).args(cargo_args);
    // Two cores: more test threads only make the probe tests contend.
    if env::var_os("RUST_TEST_THREADS").is_none() {
        cargo_test.env("RUST_TEST_THREADS", "2");
    }
    // cargo's own output (the "test result:" lines CI reads) passes through.
    let status = cargo_test
        .status()
        .with_context(|| format!("cannot start `{}`", process::describe(&cargo_test)))?;
    // The README's support table says what this run measured, pass or fail.
    if let Err(e) = support::run() {
        eprintln!("support table not updated: {e:#}");
    }
    // Every fuzz target briefly, and its regression inputs, pass or fail.
    let fuzzed = fuzz::run(fuzz::TEST_SECONDS, fuzz::default_jobs(), &[]);
    if let Err(e) = &fuzzed {
        eprintln!("error: {e:#}");
    }
    match status.code() {
        Some(0) if fuzzed.is_err() => std::process::exit(1),
        code => std::process::exit(code.unwrap_or(1)),
    }
}

/// Builds the release agent and replaces this process with it, as root.
pub fn agent(agent_args: &[String]) -> Result<()> {
    setup::run()?;
    let binary = workspace::build_release_agent()?;
    let mut agent = if process::is_root() {
        Command::new(&binary)
    } else {
        ensure!(
            process::on_path("sudo"),
            "the agent loads BPF programs and must run as root, and sudo is not available"
        );
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env=RUST_LOG").arg(&binary);
        sudo
    };
    agent.arg("agent").args(agent_args);
    let error = agent.exec();
    Err(error).with_context(|| format!("cannot start `{}`", process::describe(&agent)))
}
