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
use crate::{process::Supervised, python, workspace};

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
    match python::pyenv_python("3.11") {
        Some(path) => found.push(Interpreter {
            label: "pyenv 3.11 (shared libpython)",
            path,
        }),
        None => eprintln!("warning: no pyenv 3.11 under ~/.pyenv/versions; skipping it"),
    }
    let debian = PathBuf::from(python::DEBIAN_PYTHON_3_11);
    if debian.is_file() {
        found.push(Interpreter {
            label: "Debian python3.11 (static, PGO)",
            path: debian,
        });
    } else {
        eprintln!("warning: no {}; skipping it", debian.display());
    }
    found
}

/// Timings of one interpreter and the agent's view of its observed runs.
struct Measurement {
    interpreter: Interpreter,
    python_version: String,
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
        measurements.push(measure(
            interpreter,
            &workload,
            &bench.agent_binary,
            &agent_log,
            args.rounds,
        )?);
    }
    bench.write_results(
        "overhead",
        results_json(&measurements, args.rounds),
        &results_markdown(&measurements, args.rounds),
    )
}

fn measure(
    interpreter: Interpreter,
    workload: &Path,
    agent_binary: &Path,
    agent_log: &Path,
    rounds: usize,
) -> Result<Measurement> {
    println!("{} ({}):", interpreter.label, interpreter.path.display());
    let mut measurement = Measurement::new(interpreter);
    let mut agent: Option<RunningAgent> = None;
    for round in 1..=rounds {
        // ABBA order, see the module comment.
        let observed_first = round % 2 == 0;
        for observed in [observed_first, !observed_first] {
            let seconds = if observed {
                let running = match agent.as_mut() {
                    Some(running) => running,
                    None => agent.insert(RunningAgent::start(agent_binary, agent_log)?),
                };
                measurement.add_observed_run(running, workload)?
            } else {
                if let Some(running) = agent.take() {
                    running.stop()?;
                }
                measurement.add_unobserved_run(workload)?
            };
            let side = if observed {
                "with agent   "
            } else {
                "without agent"
            };
            println!("  round {round}: {side} {seconds:.3} s");
        }
    }
    if let Some(running) = agent {
        running.stop()?;
    }
    Ok(measurement)
}

impl Measurement {
    fn new(interpreter: Interpreter) -> Self {
        Self {
            interpreter,
            python_version: String::new(),
            without_agent: Vec::new(),
            with_agent: Vec::new(),
            cpu_without_agent: Vec::new(),
            cpu_with_agent: Vec::new(),
            observations: Vec::new(),
        }
    }

    /// Runs the workload once with no agent running; returns its seconds.
    fn add_unobserved_run(&mut self, workload: &Path) -> Result<f64> {
        let result = run_unobserved(&self.interpreter.path, workload)?;
        let (seconds, cpu_seconds) = self.note(&result)?;
        self.without_agent.push(seconds);
        self.cpu_without_agent.push(cpu_seconds);
        Ok(seconds)
    }

    /// Runs the workload once under `agent`; returns its seconds.
    fn add_observed_run(&mut self, agent: &mut RunningAgent, workload: &Path) -> Result<f64> {
        let (result, observation) = run_observed(agent, &self.interpreter.path, workload)?;
        let (seconds, cpu_seconds) = self.note(&result)?;
        self.with_agent.push(seconds);
        self.cpu_with_agent.push(cpu_seconds);
        self.observations.push(observation);
        Ok(seconds)
    }

    /// The wall and CPU seconds of a workload result, noting the Python
    /// version it gives.
    fn note(&mut self, result: &Value) -> Result<(f64, f64)> {
        self.python_version = result["python"].as_str().unwrap_or("?").to_owned();
        let seconds = |key: &str| {
            result[key]
                .as_f64()
                .with_context(|| format!("workload result without {key}: {result}"))
        };
        Ok((seconds("seconds")?, seconds("cpu_seconds")?))
    }

    fn overhead_percent(&self) -> f64 {
        overhead_percent(&self.without_agent, &self.with_agent)
    }

    fn cpu_overhead_percent(&self) -> f64 {
        overhead_percent(&self.cpu_without_agent, &self.cpu_with_agent)
    }
}

fn overhead_percent(without: &[f64], with: &[f64]) -> f64 {
    (median(with) / median(without) - 1.0) * 100.0
}

fn run_unobserved(python: &Path, workload: &Path) -> Result<Value> {
    let mut run = WorkloadRun::spawn(python, workload)?;
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
) -> Result<(Value, Observation)> {
    let mut run = WorkloadRun::spawn(python, workload)?;
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

    fn end_probe_hits_per_second(&self) -> f64 {
        self.last["probe_hits_per_second"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }

    fn to_json(&self) -> Value {
        json!({
            "accounting": self.accounting(),
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
    fn spawn(python: &Path, workload: &Path) -> Result<Self> {
        let mut command = Command::new(python);
        command
            .arg(workload)
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

fn results_json(measurements: &[Measurement], rounds: usize) -> Value {
    let interpreters: Vec<Value> = measurements
        .iter()
        .map(|m| {
            json!({
                "interpreter": m.interpreter.label,
                "path": m.interpreter.path,
                "python_version": m.python_version,
                "median_seconds_without_agent": median(&m.without_agent),
                "median_seconds_with_agent": median(&m.with_agent),
                "overhead_percent": m.overhead_percent(),
                "median_cpu_seconds_without_agent": median(&m.cpu_without_agent),
                "median_cpu_seconds_with_agent": median(&m.cpu_with_agent),
                "cpu_overhead_percent": m.cpu_overhead_percent(),
                "seconds_without_agent": m.without_agent,
                "seconds_with_agent": m.with_agent,
                "cpu_seconds_without_agent": m.cpu_without_agent,
                "cpu_seconds_with_agent": m.cpu_with_agent,
                "agent_view_at_end_of_run": m.observations.iter().map(Observation::to_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "benchmark": "overhead",
        "workload": WORKLOAD,
        "rounds": rounds,
        "agent_args": ["agent", "--listen", "127.0.0.1:<free port>"],
        "interpreters": interpreters,
    })
}

fn results_markdown(measurements: &[Measurement], rounds: usize) -> String {
    let mut markdown = format!(
        "## Agent overhead: `{WORKLOAD}`, median of {rounds} rounds\n\n\
         Wall time of the loop, and the workload's CPU time (user + system, where the \
         probes run; steadier when other work shares the machine).\n\n\
         | interpreter | Python | without agent | with agent | overhead | CPU without | CPU with | CPU overhead | accounting at end | probe hits/s at end (peak) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    for m in measurements {
        let end_rates: Vec<f64> = m
            .observations
            .iter()
            .map(Observation::end_probe_hits_per_second)
            .collect();
        let peak = m
            .observations
            .iter()
            .map(|o| o.peak_probe_hits_per_second)
            .fold(0.0, f64::max);
        markdown += &format!(
            "| {} | {} | {:.3} s | {:.3} s | {:+.1} % | {:.3} s | {:.3} s | {:+.1} % | {} | {:.0} ({:.0}) |\n",
            m.interpreter.label,
            m.python_version,
            median(&m.without_agent),
            median(&m.with_agent),
            m.overhead_percent(),
            median(&m.cpu_without_agent),
            median(&m.cpu_with_agent),
            m.cpu_overhead_percent(),
            accounting_summary(&m.observations),
            median(&end_rates),
            peak,
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
