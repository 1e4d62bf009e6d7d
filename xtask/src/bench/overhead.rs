//! `cargo xtask bench overhead`: how much slower bench/alloc_heavy.py runs
//! while the agent observes it.
//!
//! The agent observes every Python process on the machine, so a run "without"
//! must happen while no agent runs at all. Each round has one run without and
//! one with the agent, in ABBA order (without/with, with/without, ...): the
//! agent is then started and stopped once per two rounds, and slow drift of
//! the machine affects both sides alike.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{Bench, agent::RunningAgent, median};
use crate::{process::Supervised, workspace};

const WORKLOAD: &str = "bench/alloc_heavy.py";
/// Generous: one loop takes about a second.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// After the agent lists the workload, let it finish attaching so the run
/// measures the steady state, not the agent's start-up work.
const SETTLE: Duration = Duration::from_secs(1);
/// Several sample intervals of the agent (1 s by default).
const FRESH_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the agent's view is read during an observed run (its sample
/// interval is 1 s).
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(clap::Args)]
pub struct OverheadArgs {
    /// Rounds per interpreter; each has one run with and one without the agent.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

struct Interpreter {
    label: &'static str,
    path: PathBuf,
}

/// Both kinds of build that matter to the probes: pyenv's shared libpython
/// (every allocation goes through the PLT) and Debian's static PGO build
/// (allocator fast paths inlined).
fn interpreters() -> Vec<Interpreter> {
    let mut found = Vec::new();
    match test_interpreters::pyenv("3.11") {
        Some(path) => found.push(Interpreter {
            label: "pyenv 3.11 (shared libpython)",
            path,
        }),
        None => eprintln!("warning: no pyenv 3.11 under ~/.pyenv/versions; skipping it"),
    }
    match test_interpreters::debian_python_3_11() {
        Some(path) => found.push(Interpreter {
            label: "Debian python3.11 (static, PGO)",
            path,
        }),
        None => eprintln!(
            "warning: no {}; skipping it",
            test_interpreters::DEBIAN_PYTHON_3_11
        ),
    }
    found
}

/// What one interpreter measured: the workload's loop, and the calibration
/// loop that prices one probe hit.
struct Measurement {
    interpreter: Interpreter,
    python_version: String,
    workload: Series,
    calibration: Series,
}

/// Interleaved runs of one loop with and without the agent.
#[derive(Default)]
struct Series {
    without_agent: Vec<f64>,
    with_agent: Vec<f64>,
    /// The workload's own CPU time (user + system): less sensitive than
    /// wall time to other load on the machine.
    cpu_without_agent: Vec<f64>,
    cpu_with_agent: Vec<f64>,
    observations: Vec<Observation>,
}

/// The agent's record of the workload in an observed run.
struct Observation {
    /// The first record published after the loop ended.
    last: Value,
    peak_probe_hits_per_second: f64,
}

/// The calibration agent: no budget, probes on from the start, so every
/// hit of the calibration loop is a probed one.
const CALIBRATION_AGENT_ARGS: [&str; 4] = ["--probe-budget", "0", "--probe-delay", "0s"];

pub fn run(args: &OverheadArgs, bench: &Bench) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let interpreters = interpreters();
    ensure!(
        !interpreters.is_empty(),
        "no Python 3.11 interpreter to measure"
    );
    let workload = workspace::root().join(WORKLOAD);
    let agent_log = bench.results_dir()?.join("overhead-agent.log");
    std::fs::write(&agent_log, "")?;
    let mut measurements = Vec::new();
    for interpreter in interpreters {
        println!("{} ({}):", interpreter.label, interpreter.path.display());
        let mut python_version = String::new();
        let mut runs = |loop_args: &[&str], agent_args: &[&str], rounds| {
            let runner = Runner {
                python: &interpreter.path,
                workload: &workload,
                loop_args,
                agent_binary: &bench.agent_binary,
                agent_args,
                agent_log: &agent_log,
            };
            runner.series(rounds, &mut python_version)
        };
        let workload_series = runs(&[], &[], args.rounds)?;
        println!("  calibration (probe cost per hit):");
        let calibration = runs(&["probe-cost"], &CALIBRATION_AGENT_ARGS, CALIBRATION_ROUNDS)?;
        measurements.push(Measurement {
            interpreter,
            python_version,
            workload: workload_series,
            calibration,
        });
    }
    bench.write_results(
        "overhead",
        results_json(&measurements, args.rounds),
        &results_markdown(&measurements, args.rounds),
    )
}

/// Rounds of the calibration loop: its effect is large (tens of times the
/// loop), so a few suffice.
const CALIBRATION_ROUNDS: usize = 5;

/// CPU seconds one probe hit costs a process of `python`: the calibration
/// alone, for other benchmarks to price the hits they count.
pub(super) fn seconds_per_probe_hit(bench: &Bench, python: &Path) -> Result<f64> {
    let agent_log = bench.results_dir()?.join("calibration-agent.log");
    std::fs::write(&agent_log, "")?;
    let runner = Runner {
        python,
        workload: &workspace::root().join(WORKLOAD),
        loop_args: &["probe-cost"],
        agent_binary: &bench.agent_binary,
        agent_args: &CALIBRATION_AGENT_ARGS,
        agent_log: &agent_log,
    };
    let calibration = runner.series(CALIBRATION_ROUNDS, &mut String::new())?;
    let per_hit = calibration.seconds_per_hit();
    ensure!(
        per_hit.is_finite() && per_hit > 0.0,
        "the calibration priced a probe hit at {per_hit} s: too noisy to use"
    );
    println!("  one probe hit: {:.2} µs", per_hit * 1e6);
    Ok(per_hit)
}

/// Runs one loop of the workload under one agent configuration.
struct Runner<'a> {
    python: &'a Path,
    workload: &'a Path,
    loop_args: &'a [&'a str],
    agent_binary: &'a Path,
    agent_args: &'a [&'a str],
    agent_log: &'a Path,
}

impl Runner<'_> {
    fn series(&self, rounds: usize, python_version: &mut String) -> Result<Series> {
        let mut series = Series::default();
        let mut agent: Option<RunningAgent> = None;
        for round in 1..=rounds {
            // ABBA order, see the module comment.
            let observed_first = round % 2 == 0;
            for observed in [observed_first, !observed_first] {
                let (result, observation) = if observed {
                    let running = match agent.as_mut() {
                        Some(running) => running,
                        None => agent.insert(RunningAgent::start(
                            self.agent_binary,
                            self.agent_log,
                            self.agent_args,
                        )?),
                    };
                    let (result, observation) =
                        run_observed(running, self.python, self.workload, self.loop_args)?;
                    (result, Some(observation))
                } else {
                    if let Some(running) = agent.take() {
                        running.stop()?;
                    }
                    (
                        run_unobserved(self.python, self.workload, self.loop_args)?,
                        None,
                    )
                };
                *python_version = result["python"].as_str().unwrap_or("?").to_owned();
                let seconds = |key: &str| {
                    result[key]
                        .as_f64()
                        .with_context(|| format!("workload result without {key}: {result}"))
                };
                let (wall, cpu) = (seconds("seconds")?, seconds("cpu_seconds")?);
                match observation {
                    Some(observation) => {
                        series.with_agent.push(wall);
                        series.cpu_with_agent.push(cpu);
                        series.observations.push(observation);
                    }
                    None => {
                        series.without_agent.push(wall);
                        series.cpu_without_agent.push(cpu);
                    }
                }
                let side = if observed {
                    "with agent   "
                } else {
                    "without agent"
                };
                println!("  round {round}: {side} {wall:.3} s (CPU {cpu:.3} s)");
            }
        }
        if let Some(running) = agent {
            running.stop()?;
        }
        Ok(series)
    }
}

impl Series {
    fn overhead_percent(&self) -> f64 {
        overhead_percent(&self.without_agent, &self.with_agent)
    }

    fn cpu_overhead_percent(&self) -> f64 {
        overhead_percent(&self.cpu_without_agent, &self.cpu_with_agent)
    }

    /// Median over rounds of each round's own ratio: both runs of a round
    /// are adjacent in time, so slow drift of the machine cancels.
    fn paired_cpu_overhead_percent(&self) -> f64 {
        let ratios: Vec<f64> = self
            .cpu_with_agent
            .iter()
            .zip(&self.cpu_without_agent)
            .map(|(with, without)| (with / without - 1.0) * 100.0)
            .collect();
        median(&ratios)
    }

    /// Fastest run with over fastest run without: interference on a shared
    /// machine only ever slows a run down, so the fastest runs are the least
    /// disturbed ones.
    fn fastest_cpu_overhead_percent(&self) -> f64 {
        let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        (fastest(&self.cpu_with_agent) / fastest(&self.cpu_without_agent) - 1.0) * 100.0
    }

    /// Spread of the runs without the agent (max/min - 1): the noise floor
    /// any overhead figure has to be read against.
    fn noise_percent(&self) -> f64 {
        let (min, max) = self
            .cpu_without_agent
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        (max / min - 1.0) * 100.0
    }

    /// CPU seconds per probe hit, when this is a calibration series: the
    /// extra CPU time of the observed runs over their probe hits.
    fn seconds_per_hit(&self) -> f64 {
        (median(&self.cpu_with_agent) - median(&self.cpu_without_agent)) / self.median_probe_hits()
    }

    fn median_probe_hits(&self) -> f64 {
        let hits: Vec<f64> = self
            .observations
            .iter()
            .map(Observation::probe_hits)
            .collect();
        median(&hits)
    }
}

impl Measurement {
    /// CPU seconds one probe hit costs the process, from the calibration:
    /// the extra CPU time of the observed runs over their probe hits.
    fn seconds_per_hit(&self) -> f64 {
        self.calibration.seconds_per_hit()
    }

    /// The probe time of a workload run (its hits at the calibrated price)
    /// as a share of the run's CPU time without the agent: what the
    /// overhead is once the machine's noise is taken out.
    fn estimated_probe_percent(&self) -> f64 {
        self.workload.median_probe_hits() * self.seconds_per_hit()
            / median(&self.workload.cpu_without_agent)
            * 100.0
    }
}

fn overhead_percent(without: &[f64], with: &[f64]) -> f64 {
    (median(with) / median(without) - 1.0) * 100.0
}

fn run_unobserved(python: &Path, workload: &Path, loop_args: &[&str]) -> Result<Value> {
    let mut run = WorkloadRun::spawn(python, workload, loop_args)?;
    run.go()?;
    let result = run
        .result_within(RUN_TIMEOUT)?
        .context("the workload did not finish in time")?;
    run.finish()?;
    Ok(result)
}

/// Starts the loop only once the agent observes the process with every
/// probe attached (the costly case), and reads the agent's record of it
/// while the loop runs.
fn run_observed(
    agent: &mut RunningAgent,
    python: &Path,
    workload: &Path,
    loop_args: &[&str],
) -> Result<(Value, Observation)> {
    let mut run = WorkloadRun::spawn(python, workload, loop_args)?;
    let pid = run.pid();
    agent.wait_until_observed(&[pid], OBSERVE_TIMEOUT)?;
    thread::sleep(SETTLE);
    run.go()?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut observation = Observation {
        last: Value::Null,
        peak_probe_hits_per_second: 0.0,
    };
    let result = loop {
        if let Some(result) = run.result_within(POLL_INTERVAL)? {
            break result;
        }
        ensure!(
            Instant::now() < deadline,
            "the workload did not finish in time"
        );
        if let Some(record) = agent.process(pid)? {
            observation.record(record);
        }
    };
    // The process waits for us meanwhile, so the agent still lists it.
    if let Some(record) = record_after_now(agent, pid)? {
        observation.record(record);
    }
    run.finish()?;
    Ok((result, observation))
}

/// The agent publishes a snapshot once per sample interval, so what it
/// answers now may predate the loop's end: wait for the next snapshot (its
/// `observed_seconds` grows), which was taken after this call started.
fn record_after_now(agent: &RunningAgent, pid: u32) -> Result<Option<Value>> {
    let observed_seconds =
        |record: &Option<Value>| record.as_ref().and_then(|r| r["observed_seconds"].as_f64());
    let current = agent.process(pid)?;
    let deadline = Instant::now() + FRESH_SNAPSHOT_TIMEOUT;
    loop {
        thread::sleep(Duration::from_millis(100));
        let record = agent.process(pid)?;
        if observed_seconds(&record) > observed_seconds(&current) {
            return Ok(record);
        }
        if Instant::now() > deadline {
            eprintln!("warning: the agent published no new snapshot of pid {pid} in time");
            return Ok(record.or(current));
        }
    }
}

impl Observation {
    fn record(&mut self, record: Value) {
        let rate = record["probe_hits_per_second"].as_f64().unwrap_or(0.0);
        self.peak_probe_hits_per_second = self.peak_probe_hits_per_second.max(rate);
        self.last = record;
    }

    fn accounting(&self) -> &str {
        self.last["accounting"].as_str().unwrap_or("unobserved")
    }

    fn probe_hits(&self) -> f64 {
        self.last["probe_hits_total"].as_f64().unwrap_or(f64::NAN)
    }

    fn end_probe_hits_per_second(&self) -> f64 {
        self.last["probe_hits_per_second"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }

    fn to_json(&self) -> Value {
        json!({
            "accounting": self.accounting(),
            "probe_hits_total": self.probe_hits(),
            "probe_hits_per_second": self.end_probe_hits_per_second(),
            "probe_hits_per_second_peak": self.peak_probe_hits_per_second,
            "allocated_bytes_by_source": self.last["allocated_bytes_by_source"],
            "heap_bytes": self.last["heap_bytes"],
        })
    }
}

/// One run of the workload, following its stdin/stdout protocol.
struct WorkloadRun {
    process: Supervised,
    stdin: ChildStdin,
    result: Receiver<Result<Value>>,
}

impl WorkloadRun {
    fn spawn(python: &Path, workload: &Path, loop_args: &[&str]) -> Result<Self> {
        let mut command = Command::new(python);
        command
            .arg(workload)
            .args(loop_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = Supervised::spawn(&mut command, "workload", Duration::from_secs(5))?;
        let child = process.child_mut();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        // A thread reads the result line so the caller can poll the agent
        // meanwhile.
        let (sender, result) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let parsed = BufReader::new(stdout)
                .read_line(&mut line)
                .context("reading the workload's result")
                .and_then(|_| {
                    serde_json::from_str(&line)
                        .with_context(|| format!("workload printed {line:?}, not its result"))
                });
            let _ = sender.send(parsed);
        });
        Ok(Self {
            process,
            stdin,
            result,
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn go(&mut self) -> Result<()> {
        writeln!(self.stdin, "go")?;
        Ok(self.stdin.flush()?)
    }

    /// The result line, or None if it has not come within `timeout`.
    fn result_within(&self, timeout: Duration) -> Result<Option<Value>> {
        match self.result.recv_timeout(timeout) {
            Ok(result) => result.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("the workload's reader thread died"),
        }
    }

    /// Closes stdin, which lets the workload exit.
    fn finish(self) -> Result<()> {
        let Self { process, stdin, .. } = self;
        drop(stdin);
        let status = process.wait()?;
        ensure!(status.success(), "the workload exited with {status}");
        Ok(())
    }
}

fn series_json(series: &Series) -> Value {
    json!({
        "median_seconds_without_agent": median(&series.without_agent),
        "median_seconds_with_agent": median(&series.with_agent),
        "overhead_percent": series.overhead_percent(),
        "median_cpu_seconds_without_agent": median(&series.cpu_without_agent),
        "median_cpu_seconds_with_agent": median(&series.cpu_with_agent),
        "cpu_overhead_percent": series.cpu_overhead_percent(),
        "paired_cpu_overhead_percent": series.paired_cpu_overhead_percent(),
        "fastest_cpu_overhead_percent": series.fastest_cpu_overhead_percent(),
        "noise_percent": series.noise_percent(),
        "median_probe_hits": series.median_probe_hits(),
        "seconds_without_agent": series.without_agent,
        "seconds_with_agent": series.with_agent,
        "cpu_seconds_without_agent": series.cpu_without_agent,
        "cpu_seconds_with_agent": series.cpu_with_agent,
        "agent_view_at_end_of_run": series.observations.iter().map(Observation::to_json).collect::<Vec<_>>(),
    })
}

fn results_json(measurements: &[Measurement], rounds: usize) -> Value {
    let interpreters: Vec<Value> = measurements
        .iter()
        .map(|m| {
            json!({
                "interpreter": m.interpreter.label,
                "path": m.interpreter.path,
                "python_version": m.python_version,
                "workload": series_json(&m.workload),
                "calibration": series_json(&m.calibration),
                "microseconds_per_probe_hit": m.seconds_per_hit() * 1e6,
                "estimated_probe_percent": m.estimated_probe_percent(),
            })
        })
        .collect();
    json!({
        "benchmark": "overhead",
        "workload": WORKLOAD,
        "rounds": rounds,
        "calibration_rounds": CALIBRATION_ROUNDS,
        "agent_args": ["agent", "--listen", "127.0.0.1:<free port>"],
        "calibration_agent_args": CALIBRATION_AGENT_ARGS,
        "interpreters": interpreters,
    })
}

fn results_markdown(measurements: &[Measurement], rounds: usize) -> String {
    let mut markdown = format!(
        "## Agent overhead: `{WORKLOAD}`, median of {rounds} rounds\n\n\
         The agent runs with its defaults: probe budget on, Python stacks captured at \
         every new arena and at byte-sampled blocks (`--sample-bytes` 256 KiB). \
         Wall time of the loop, and the workload's CPU time (user + system, where the \
         probes run). *Paired* is the median of each round's own ratio; *fastest*, the fastest \
         run with over the fastest without (interference only slows runs down); *noise* is the \
         spread of the runs without the agent (max/min), which bounds what a timing \
         can show. *Probe time* prices the run's probe hits at the cost per hit \
         measured by the calibration loop (`{WORKLOAD} probe-cost`, {CALIBRATION_ROUNDS} \
         rounds, agent without budget).\n\n\
         | interpreter | Python | without agent | with agent | overhead | CPU without | CPU with | CPU overhead | paired | fastest | noise | probe hits per run | cost per hit | probe time | accounting at end |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for m in measurements {
        let w = &m.workload;
        markdown += &format!(
            "| {} | {} | {:.3} s | {:.3} s | {:+.1} % | {:.3} s | {:.3} s | {:+.1} % | {:+.1} % | {:+.1} % | {:.0} % | {:.0} | {:.1} µs | {:.2} % | {} |\n",
            m.interpreter.label,
            m.python_version,
            median(&w.without_agent),
            median(&w.with_agent),
            w.overhead_percent(),
            median(&w.cpu_without_agent),
            median(&w.cpu_with_agent),
            w.cpu_overhead_percent(),
            w.paired_cpu_overhead_percent(),
            w.fastest_cpu_overhead_percent(),
            w.noise_percent(),
            w.median_probe_hits(),
            m.seconds_per_hit() * 1e6,
            m.estimated_probe_percent(),
            accounting_summary(&w.observations),
        );
    }
    markdown
}
/// E.g. "syscalls ×5, probes ×2".
fn accounting_summary(observations: &[Observation]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for observation in observations {
        *counts.entry(observation.accounting()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(accounting, count)| format!("{accounting} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
