//! `cargo xtask bench`: what the agent costs the observed processes
//! (`overhead`), what it costs the machine while they idle (`idle`), and
//! what an object census costs (`census`).
mod agent;
mod api;
mod census;
mod idle;
mod overhead;
mod peers;
mod soak;

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use clap::Subcommand;
use serde_json::Value;

use crate::{process, setup, workspace};
pub use peers::update_readme;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Slow-down of an allocation-heavy Python loop while the agent observes it.
    Overhead(overhead::OverheadArgs),
    /// The agent's memory and CPU while many Python processes sleep.
    Idle(idle::IdleArgs),
    /// What an object census costs (pause, copy, parse, agent memory) for
    /// heaps of ~100 MiB and ~1 GiB.
    Census(census::CensusArgs),
    /// The agent under process churn for minutes: its memory, its maps,
    /// what it loses or misses, and the accuracy of long-lived leakers.
    Soak(soak::SoakArgs),
    /// pymem beside tracemalloc, memray, ddtrace's memory profiler and
    /// mprof on five workloads: slow-down, extra RSS, what each needs and
    /// what each finds on a leak; then the agent's scaling.
    Peers(peers::PeersArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    ensure!(
        process::is_root(),
        "the benchmarks run the agent, which loads BPF programs: run as root"
    );
    setup::run()?;
    let bench = Bench {
        agent_binary: workspace::build_release_agent()?,
        kernel: kernel_release(),
        other_agents_at_start: other_agent_pids(),
    };
    if !bench.other_agents_at_start.is_empty() {
        eprintln!("warning: {}", bench.other_agents_note());
    }
    match command {
        BenchCommand::Overhead(args) => overhead::run(&args, &bench),
        BenchCommand::Idle(args) => idle::run(&args, &bench),
        BenchCommand::Census(args) => census::run(&args, &bench),
        BenchCommand::Soak(args) => soak::run(&args, &bench),
        BenchCommand::Peers(args) => peers::run(&args, &bench),
    }
}

/// What every benchmark shares: the agent it runs, and facts about the
/// machine that go with its results.
struct Bench {
    agent_binary: PathBuf,
    kernel: String,
    /// Another agent (a developer's, a test's) observes the benchmark's
    /// processes, "without agent" runs included, and competes for the CPU.
    other_agents_at_start: Vec<u32>,
}

impl Bench {
    fn other_agents_note(&self) -> String {
        format!(
            "other pymem agents were running (pids {:?}): they observe the benchmark's \
             processes and skew its numbers",
            self.other_agents_at_start
        )
    }

    /// target/bench/, where results and agent logs go.
    fn results_dir(&self) -> Result<PathBuf> {
        let dir = workspace::target_dir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Writes `<name>.json` and `<name>.md` into target/bench/, with the
    /// machine facts added, and prints the Markdown.
    fn write_results(&self, name: &str, mut json: Value, markdown: &str) -> Result<()> {
        json["kernel"] = self.kernel.clone().into();
        json["other_pymem_agents_at_start"] = self.other_agents_at_start.clone().into();
        let mut markdown = format!("{markdown}\nKernel {}.\n", self.kernel);
        if !self.other_agents_at_start.is_empty() {
            markdown += &format!("\n**Warning:** {}.\n", self.other_agents_note());
        }
        let dir = self.results_dir()?;
        let json_path = dir.join(format!("{name}.json"));
        let markdown_path = dir.join(format!("{name}.md"));
        fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")?;
        fs::write(&markdown_path, &markdown)?;
        println!("\n{markdown}");
        println!(
            "wrote {} and {}",
            json_path.display(),
            markdown_path.display()
        );
        Ok(())
    }
}

/// Running processes named `pymem` (the agent binary).
fn other_agent_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "pymem")
        })
        .collect()
}

/// Kernel release, for the record: probe costs depend on it.
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_default()
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
