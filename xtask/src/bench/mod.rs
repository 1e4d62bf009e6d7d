//! `cargo xtask bench`: what the agent costs the observed processes
//! (`overhead`) and what it costs the machine while they idle (`idle`).
mod agent;
mod api;
mod idle;
mod overhead;

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use clap::Subcommand;
use serde_json::Value;

use crate::{process, setup, workspace};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Slow-down of an allocation-heavy Python loop while the agent observes it.
    Overhead(overhead::OverheadArgs),
    /// The agent's memory and CPU while many Python processes sleep.
    Idle(idle::IdleArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    ensure!(
        process::is_root(),
        "the benchmarks run the agent, which loads BPF programs: run as root"
    );
    setup::run()?;
    let agent_binary = workspace::build_release_agent()?;
    match command {
        BenchCommand::Overhead(args) => overhead::run(&args, &agent_binary),
        BenchCommand::Idle(args) => idle::run(&args, &agent_binary),
    }
}

/// target/bench/, where results and agent logs go.
fn results_dir() -> Result<PathBuf> {
    let dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes `<name>.json` and `<name>.md` into target/bench/ and prints the
/// Markdown.
fn write_results(name: &str, json: &Value, markdown: &str) -> Result<()> {
    let dir = results_dir()?;
    let json_path = dir.join(format!("{name}.json"));
    let markdown_path = dir.join(format!("{name}.md"));
    fs::write(&json_path, serde_json::to_string_pretty(json)? + "\n")?;
    fs::write(&markdown_path, markdown)?;
    println!("\n{markdown}");
    println!(
        "wrote {} and {}",
        json_path.display(),
        markdown_path.display()
    );
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Kernel release, for the record: probe costs depend on it.
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
