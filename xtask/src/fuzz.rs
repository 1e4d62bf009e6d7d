//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the fuzz targets of `fuzz/`
//! (cargo-fuzz, libFuzzer) on the pinned nightly, each for N seconds after
//! replaying its regression inputs; fails if any input crashes one. Targets
//! run `--jobs` at a time (default: one per CPU), each a single libFuzzer
//! process, so that N seconds per target is N CPU-seconds each.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    process::{self, describe},
    setup, workspace,
};

/// Seconds each target runs within `cargo xtask test`.
pub const TEST_SECONDS: u64 = 12;

fn fuzz_dir() -> PathBuf {
    workspace::root().join("fuzz")
}

/// The targets, from `fuzz/fuzz_targets/*.rs`.
pub fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// What one target's run found.
struct Outcome {
    target: String,
    runs: Option<u64>,
    execs_per_second: Option<u64>,
    corpus_files: usize,
    corpus_bytes: u64,
    crashes: Vec<PathBuf>,
}

/// One job per CPU.
pub fn default_jobs() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run(seconds: u64, jobs: usize, chosen: &[String]) -> Result<()> {
    setup::ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let all = targets()?;
    for target in chosen {
        ensure!(
            all.contains(target),
            "no fuzz target {target} (targets: {})",
            all.join(", ")
        );
    }
    let targets = if chosen.is_empty() { &all } else { chosen };
    process::run(cargo_fuzz().args(["build", "--debug-assertions"]))?;
    let jobs = jobs.clamp(1, targets.len().max(1));
    let outcomes = fuzz_all(targets, seconds, jobs)?;
    let cpu_seconds = seconds * outcomes.len() as u64;
    println!(
        "fuzz: {seconds} s per target, {jobs} at a time: {:.2} CPU-hours",
        cpu_seconds as f64 / 3600.0
    );
    for o in &outcomes {
        let count = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
        println!(
            "  {:<14} runs {:>10}  exec/s {:>7}  corpus {:>5} files {:>9} bytes  crashes {}",
            o.target,
            count(o.runs),
            count(o.execs_per_second),
            o.corpus_files,
            o.corpus_bytes,
            o.crashes.len()
        );
        for crash in &o.crashes {
            println!("    {}", crash.display());
        }
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.crashes.is_empty())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (fix the cause, then keep each input in fuzz/regressions/<target>/)",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// cargo-fuzz on the pinned nightly, in the workspace root; the agent is
/// built without its eBPF object, which no target needs.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", setup::EBPF_TOOLCHAIN, "cargo", "fuzz"])
        .current_dir(workspace::root())
        // cargo-fuzz builds with the cargo `CARGO` names: the one running
        // xtask is the stable one.
        .env_remove("CARGO")
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    if process::succeeds(cargo_fuzz().arg("--version")) {
        println!("  cargo-fuzz: present");
        return Ok(());
    }
    process::run(workspace::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    ensure!(
        process::succeeds(cargo_fuzz().arg("--version")),
        "after `cargo install cargo-fuzz`, `cargo fuzz --version` still fails; is ~/.cargo/bin on PATH?"
    );
    println!("  cargo-fuzz: installed");
    Ok(())
}

/// Every target, `jobs` at a time, in the order given; the first error
/// (a target that cannot start, or a regression input that crashes again)
/// once all have run.
fn fuzz_all(targets: &[String], seconds: u64, jobs: usize) -> Result<Vec<Outcome>> {
    let next = Mutex::new(targets.iter().enumerate());
    let results: Mutex<Vec<(usize, Result<Outcome>)>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let Some((index, target)) = next.lock().expect("fuzz queue").next() else {
                        break;
                    };
                    let outcome = fuzz_one(target, seconds);
                    results.lock().expect("fuzz results").push((index, outcome));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("fuzz results");
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, outcome)| outcome).collect()
}

fn fuzz_one(target: &str, seconds: u64) -> Result<Outcome> {
    let dir = fuzz_dir();
    let binary = dir
        .join("target/x86_64-unknown-linux-gnu/release")
        .join(target);
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for path in [&corpus, &artifacts] {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    }
    let before = files(&artifacts);
    // Inputs that crashed a target once must not crash it again.
    let regressions = files(&dir.join("regressions").join(target));
    if !regressions.is_empty() {
        let mut replay = Command::new(&binary);
        replay.args(&regressions);
        let output = replay
            .output()
            .with_context(|| format!("cannot start `{}`", describe(&replay)))?;
        if !output.status.success() {
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            bail!("{target}: a regression input crashes it again");
        }
    }
    println!("fuzzing {target} for {seconds} s");
    let seeds = dir.join("seeds").join(target);
    // libFuzzer cuts inputs to 1 MiB unless told; the census seeds are
    // heap copies of a few MiB.
    let max_len = files(&seeds)
        .iter()
        .chain(&files(&corpus))
        .filter_map(|path| fs::metadata(path).ok())
        .map(|meta| meta.len())
        .max()
        .unwrap_or(0)
        .max(4096);
    let mut fuzz = Command::new(&binary);
    fuzz.arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        // A single allocation over 2 GiB is a finding (sizes taken from
        // the input unchecked); the process's RSS may grow past that, as
        // libFuzzer keeps its whole corpus in memory, and the census's
        // corpus of heap copies passes 1.5 GiB within 15 minutes.
        .args([
            "-timeout=10",
            "-malloc_limit_mb=2048",
            "-rss_limit_mb=8192",
            "-print_final_stats=1",
        ])
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    let output = fuzz
        .output()
        .with_context(|| format!("cannot start `{}`", describe(&fuzz)))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let crashes: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|path| !before.contains(path))
        .collect();
    if !output.status.success() || !crashes.is_empty() {
        // libFuzzer's report: the panic, the input, how to reproduce.
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
    }
    let mut crashes = crashes;
    if !output.status.success() && crashes.is_empty() {
        crashes.push(PathBuf::from(format!("(exit status {})", output.status)));
    }
    let corpus_files = files(&corpus);
    Ok(Outcome {
        target: target.to_owned(),
        runs: stat(&log, "stat::number_of_executed_units:"),
        execs_per_second: stat(&log, "stat::average_exec_per_sec:"),
        corpus_bytes: corpus_files
            .iter()
            .filter_map(|path| fs::metadata(path).ok())
            .map(|meta| meta.len())
            .sum(),
        corpus_files: corpus_files.len(),
        crashes,
    })
}

/// The number after `key` in libFuzzer's final statistics.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .find_map(|line| line.trim().strip_prefix(key))
        .and_then(|value| value.trim().parse().ok())
}

/// The files directly in `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_final_statistics() {
        let log = "#1024\tDONE   cov: 10\nstat::number_of_executed_units: 4096\nstat::average_exec_per_sec:     341\n";
        assert_eq!(stat(log, "stat::number_of_executed_units:"), Some(4096));
        assert_eq!(stat(log, "stat::average_exec_per_sec:"), Some(341));
        assert_eq!(stat(log, "stat::new_units_added:"), None);
    }

    #[test]
    fn every_target_is_found() {
        let found = targets().unwrap();
        assert!(found.contains(&"census".to_string()), "{found:?}");
    }
}
