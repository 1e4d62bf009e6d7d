//! `cargo xtask bench peers`: pymem beside the in-process memory tools it
//! replaces, on the same workloads, interleaved in one run: each workload
//! of bench/peers/ without a tool, under pymem (the agent in its default
//! mode, observing from outside), under tracemalloc (1 and 25 frames),
//! memray (`run`, and `run --trace-python-allocators`), Datadog's memory
//! profiler (`ddtrace-run`, pprof to a local file) and memory_profiler's
//! `mprof run`. For each: the slow-down in CPU and wall time, the extra peak
//! RSS, what it takes to use it (a code change, a restart), and on the leak
//! workload what its own output names. Then the agent's scaling: idle and
//! busy processes, the time to observe a new process, census times.
//!
//! The agent observes every Python process on the machine, so it runs only
//! during pymem's runs: it is started before and stopped after each of them.
mod found;
mod load;
mod report;
mod scaling;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{Bench, agent::RunningAgent, census, idle};
use crate::{
    process::{self, Supervised},
    setup, workspace,
};
pub use report::update_readme;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const RESULT_TIMEOUT: Duration = Duration::from_secs(900);
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// As `bench overhead`: after the agent lists the workload with its probes
/// attached, let it settle.
const SETTLE: Duration = Duration::from_secs(1);
/// Over one sample interval of the agent (1 s by default).
const SAMPLED: Duration = Duration::from_millis(1200);

/// The peers, into the benchmark's own virtual environment: (pip name,
/// module that must import). pip takes its index from the machine's own
/// configuration.
const PEER_PACKAGES: &[(&str, &str)] = &[
    ("flask", "flask"),
    ("numpy", "numpy"),
    ("pandas", "pandas"),
    ("memray", "memray"),
    ("ddtrace", "ddtrace"),
    ("memory_profiler", "memory_profiler"),
    ("psutil", "psutil"),
];

#[derive(clap::Args)]
pub struct PeersArgs {
    /// Interleaved rounds: each runs every workload under every tool once.
    #[arg(long)]
    rounds: Option<usize>,
    /// Fewer rounds (2 unless --rounds), a third of the work per run,
    /// shorter load and scaling phases: about 5-10 minutes.
    #[arg(long)]
    quick: bool,
    /// Skip the scaling section (idle and busy processes, census times).
    #[arg(long)]
    no_scaling: bool,
    /// Also rewrite README.md's performance section from the results.
    #[arg(long)]
    readme: bool,
    /// Only these tools (ids as in the report: pymem, memray, ...), beside
    /// the runs without a tool; the results go to peers-subset.{json,md}
    /// and the scaling section is skipped.
    #[arg(long, value_delimiter = ',', value_parser = Tool::parse)]
    tools: Vec<Tool>,
    /// Only these workloads (alloc_heavy, flask_service, ...); as --tools.
    #[arg(long, value_delimiter = ',', value_parser = Workload::parse)]
    workloads: Vec<Workload>,
}

/// How the run is sized.
pub(super) struct Plan {
    rounds: usize,
    quick: bool,
    /// PEERS_SCALE for the workloads.
    scale: f64,
    /// How long the load generator drives the Flask service per run.
    load_seconds: u64,
    load_clients: usize,
    /// Every tool run, no tool first.
    tools: Vec<Tool>,
    workloads: Vec<Workload>,
}

impl Plan {
    /// Whether every tool and workload runs (the README's table needs all).
    fn is_complete(&self) -> bool {
        self.tools.len() == Tool::ALL.len() && self.workloads.len() == Workload::ALL.len()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Tool {
    None,
    Pymem,
    Tracemalloc1,
    Tracemalloc25,
    Memray,
    MemrayPython,
    Ddtrace,
    Mprof,
}

impl Tool {
    pub(super) const ALL: [Tool; 8] = [
        Tool::None,
        Tool::Pymem,
        Tool::Tracemalloc1,
        Tool::Tracemalloc25,
        Tool::Memray,
        Tool::MemrayPython,
        Tool::Ddtrace,
        Tool::Mprof,
    ];

    pub(super) fn id(self) -> &'static str {
        match self {
            Tool::None => "none",
            Tool::Pymem => "pymem",
            Tool::Tracemalloc1 => "tracemalloc-1",
            Tool::Tracemalloc25 => "tracemalloc-25",
            Tool::Memray => "memray",
            Tool::MemrayPython => "memray-python-allocators",
            Tool::Ddtrace => "ddtrace",
            Tool::Mprof => "mprof",
        }
    }

    fn parse(id: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|tool| tool.id() == id)
            .ok_or_else(|| {
                let ids: Vec<_> = Self::ALL.iter().map(|t| t.id()).collect();
                format!("no tool {id:?}; one of {}", ids.join(", "))
            })
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Tool::None => "no tool",
            Tool::Pymem => "pymem (agent, defaults)",
            Tool::Tracemalloc1 => "tracemalloc, 1 frame",
            Tool::Tracemalloc25 => "tracemalloc, 25 frames",
            Tool::Memray => "memray run",
            Tool::MemrayPython => "memray run --trace-python-allocators",
            Tool::Ddtrace => "ddtrace-run, memory profiler",
            Tool::Mprof => "mprof run",
        }
    }

    /// What using it takes.
    pub(super) fn needs(self) -> &'static str {
        match self {
            Tool::None => "–",
            Tool::Pymem => "neither",
            Tool::Tracemalloc1 | Tool::Tracemalloc25 => "code change (and restart)",
            Tool::Memray | Tool::MemrayPython | Tool::Ddtrace | Tool::Mprof => {
                "restart under its launcher"
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Workload {
    Alloc,
    Flask,
    Pandas,
    Numpy,
    Leak,
}

impl Workload {
    pub(super) const ALL: [Workload; 5] = [
        Workload::Alloc,
        Workload::Flask,
        Workload::Pandas,
        Workload::Numpy,
        Workload::Leak,
    ];

    pub(super) fn id(self) -> &'static str {
        match self {
            Workload::Alloc => "alloc_heavy",
            Workload::Flask => "flask_service",
            Workload::Pandas => "pandas_groupby",
            Workload::Numpy => "numpy_pipeline",
            Workload::Leak => "leak",
        }
    }

    fn parse(id: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|workload| workload.id() == id)
            .ok_or_else(|| {
                let ids: Vec<_> = Self::ALL.iter().map(|w| w.id()).collect();
                format!("no workload {id:?}; one of {}", ids.join(", "))
            })
    }

    fn script(self) -> PathBuf {
        workspace::root()
            .join("bench/peers")
            .join(format!("{}.py", self.id()))
    }
}

/// One run of one workload under one tool.
pub(super) struct Run {
    /// Seconds of the work (Flask: per request, from the load generator).
    wall: f64,
    /// The target's CPU seconds (Flask: per request).
    cpu: f64,
    peak_rss_kib: f64,
    load: Option<load::LoadResult>,
    agent: Option<AgentCost>,
    found: Option<found::Found>,
}

/// The agent's own cost over a pymem run's work.
struct AgentCost {
    cpu_percent: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
    /// The workload's budgeted probe hits over its life, as the agent
    /// counted them (the start-up burst's cost), and its accounting then.
    probe_hits: Option<u64>,
    /// Of those, the hits during the timed work: from the agent's last
    /// snapshot before "go" (up to a sample interval old, so hits just
    /// before the work may count) to its first after the result.
    probe_hits_during_work: Option<u64>,
    /// The target's CPU seconds over the whole work (Flask: all requests).
    work_cpu_seconds: f64,
    accounting: Option<String>,
    /// How long one object census paused the workload, taken after its
    /// work (so that it does not disturb the timing): what a census every
    /// minute would cost it is this over 60 s.
    census_pause_seconds: Option<f64>,
}

pub fn run(args: &PeersArgs, bench: &Bench) -> Result<()> {
    let plan = Plan {
        rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }),
        quick: args.quick,
        scale: if args.quick { 0.35 } else { 1.0 },
        load_seconds: if args.quick { 3 } else { 8 },
        load_clients: 2,
        tools: Tool::ALL
            .into_iter()
            .filter(|t| *t == Tool::None || args.tools.is_empty() || args.tools.contains(t))
            .collect(),
        workloads: Workload::ALL
            .into_iter()
            .filter(|w| args.workloads.is_empty() || args.workloads.contains(w))
            .collect(),
    };
    ensure!(plan.rounds > 0, "--rounds must be at least 1");
    ensure!(
        plan.is_complete() || !args.readme,
        "--readme needs every tool and workload: the README's table shows them all"
    );
    let dir = bench.results_dir()?;
    // zstd decompresses ddtrace's profiles.
    crate::setup::ensure_apt_packages(&["zstd"]);
    let venv = ensure_venv(&dir.join("peers-venv"))?;
    let out = dir.join("peers-out");
    fs::create_dir_all(&out)?;
    let logs = Logs {
        agent: dir.join("peers-agent.log"),
        tools: dir.join("peers-tools.log"),
    };
    fs::write(&logs.agent, "")?;
    fs::write(&logs.tools, "")?;
    let leak_line = found::marked_line(&fs::read_to_string(Workload::Leak.script())?, "# LEAK")
        .context("bench/peers/leak.py has no line marked # LEAK")?;
    let seconds_per_probe_hit = if plan.tools.contains(&Tool::Pymem) {
        println!("peers: pricing one probe hit (the calibration of bench overhead)");
        Some(super::overhead::seconds_per_probe_hit(bench, &venv)?)
    } else {
        None
    };
    let mut runs: Vec<(Tool, Workload, Run)> = Vec::new();
    let started = Instant::now();
    for round in 0..plan.rounds {
        for (w, &workload) in plan.workloads.iter().enumerate() {
            // Each round and workload starts at another tool, so slow
            // drift of the machine spreads over all of them.
            let n = plan.tools.len();
            for k in 0..n {
                let tool = plan.tools[(k + round + w) % n];
                let context = Context {
                    bench,
                    venv: &venv,
                    out: &out,
                    logs: &logs,
                    plan: &plan,
                    leak_line,
                };
                let run = context
                    .run_once(tool, workload)
                    .with_context(|| format!("{} under {}", workload.id(), tool.label()))?;
                println!(
                    "  round {}: {:<15} {:<38} CPU {:.4} s, wall {:.4} s, peak RSS {:.0} MiB{}",
                    round + 1,
                    workload.id(),
                    tool.label(),
                    run.cpu,
                    run.wall,
                    run.peak_rss_kib / 1024.0,
                    run.found
                        .as_ref()
                        .map(|f| format!(", found: {}", f.summary()))
                        .unwrap_or_default()
                );
                runs.push((tool, workload, run));
            }
        }
    }
    let peers_seconds = started.elapsed().as_secs_f64();
    let scaling = if args.no_scaling || !plan.is_complete() {
        Value::Null
    } else {
        scaling::run(bench, &plan)?
    };
    let mut json = report::results_json(&plan, &runs, leak_line, &venv, seconds_per_probe_hit);
    json["peers_seconds"] = peers_seconds.into();
    json["scaling"] = scaling;
    json["total_seconds"] = started.elapsed().as_secs_f64().into();
    let markdown = report::markdown(&json);
    let name = if plan.is_complete() {
        "peers"
    } else {
        "peers-subset"
    };
    let svg = dir.join(format!("{name}.svg"));
    fs::write(&svg, report::svg(&json))?;
    bench.write_results(name, json, &markdown)?;
    println!("wrote {}", svg.display());
    if args.readme {
        update_readme()?;
    }
    Ok(())
}

struct Logs {
    agent: PathBuf,
    tools: PathBuf,
}

/// The python of the benchmark's own virtual environment (from pyenv
/// 3.11), with every peer importable; creates and fills it as needed.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.exists() {
        let base = test_interpreters::pyenv("3.11")
            .context("no pyenv 3.11 under ~/.pyenv/versions to make the peers' venv from")?;
        println!("peers: creating {}", venv.display());
        process::run(Command::new(&base).arg("-m").arg("venv").arg(venv))?;
    }
    let missing: Vec<&str> = PEER_PACKAGES
        .iter()
        .filter(|(_, module)| !setup::importable(&python, module))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("peers: {} has every peer", venv.display());
    } else {
        println!("peers: installing {}", missing.join(", "));
        setup::pip_install(&python, &missing)?;
    }
    Ok(python)
}

struct Context<'a> {
    bench: &'a Bench,
    venv: &'a Path,
    out: &'a Path,
    logs: &'a Logs,
    plan: &'a Plan,
    leak_line: u32,
}

impl Context<'_> {
    fn bin(&self, name: &str) -> PathBuf {
        self.venv.with_file_name(name)
    }

    /// The command that runs `workload` under `tool`, as its users would.
    fn command(&self, tool: Tool, workload: Workload) -> Command {
        let script = workload.script();
        let mut command = match tool {
            Tool::None | Tool::Pymem => {
                let mut c = Command::new(self.venv);
                c.arg(&script);
                c
            }
            Tool::Tracemalloc1 | Tool::Tracemalloc25 => {
                let mut c = Command::new(self.venv);
                c.arg(workspace::root().join("bench/peers/tracemalloc_run.py"))
                    .arg(if tool == Tool::Tracemalloc1 {
                        "1"
                    } else {
                        "25"
                    })
                    .arg(&script)
                    .env(
                        "PEERS_TRACEMALLOC_REPORT",
                        self.out.join("tracemalloc.json"),
                    );
                c
            }
            Tool::Memray | Tool::MemrayPython => {
                let mut c = Command::new(self.bin("memray"));
                c.args(["run", "--force", "-o"])
                    .arg(self.out.join("memray.bin"));
                if tool == Tool::MemrayPython {
                    c.arg("--trace-python-allocators");
                }
                c.arg(&script);
                c
            }
            Tool::Ddtrace => {
                let mut c = Command::new(self.bin("ddtrace-run"));
                c.arg(self.venv).arg(&script);
                // The memory profiler alone, its profile written to a local
                // file; nothing sent anywhere (no agent listens on the
                // discard port).
                for (key, value) in [
                    ("DD_PROFILING_ENABLED", "true"),
                    ("DD_PROFILING_MEMORY_ENABLED", "true"),
                    ("DD_PROFILING_HEAP_ENABLED", "true"),
                    ("DD_PROFILING_STACK_ENABLED", "false"),
                    ("DD_PROFILING_LOCK_ENABLED", "false"),
                    ("DD_TRACE_ENABLED", "false"),
                    ("DD_INSTRUMENTATION_TELEMETRY_ENABLED", "false"),
                    ("DD_REMOTE_CONFIGURATION_ENABLED", "false"),
                    ("DD_AGENT_HOST", "127.0.0.1"),
                    ("DD_TRACE_AGENT_PORT", "9"),
                ] {
                    c.env(key, value);
                }
                c.env("DD_PROFILING_OUTPUT_PPROF", self.out.join("ddtrace"));
                c
            }
            Tool::Mprof => {
                let mut c = Command::new(self.bin("mprof"));
                c.args(["run", "--nopython", "-o"])
                    .arg(self.out.join("mprof.dat"))
                    .arg(self.venv)
                    .arg(&script);
                c
            }
        };
        command.env("PEERS_SCALE", self.plan.scale.to_string());
        command
    }

    fn clear_outputs(&self) -> Result<()> {
        for entry in fs::read_dir(self.out)? {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn run_once(&self, tool: Tool, workload: Workload) -> Result<Run> {
        self.clear_outputs()?;
        let mut agent = match tool {
            Tool::Pymem => Some(RunningAgent::start(
                &self.bench.agent_binary,
                &self.logs.agent,
                &[],
            )?),
            _ => None,
        };
        let log = fs::File::options()
            .append(true)
            .create(true)
            .open(&self.logs.tools)?;
        let mut command = self.command(tool, workload);
        command
            .current_dir(self.out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut target = Target::spawn(
            &mut command,
            &format!("{} under {}", workload.id(), tool.id()),
        )?;
        let ready = target.expect("READY", READY_TIMEOUT)?;
        let pid = u32::try_from(ready["pid"].as_u64().context("READY without pid")?)?;
        let mut hits_before_work = None;
        if let Some(agent) = agent.as_mut() {
            agent.wait_until_observed(&[pid], OBSERVE_TIMEOUT)?;
            thread::sleep(SETTLE);
            hits_before_work = probe_hits(&agent.process(pid)?);
        }
        let agent_before = match &agent {
            Some(agent) => Some((idle::cpu_nanos(agent.pid())?, Instant::now())),
            None => None,
        };
        target.send("go")?;
        let load = if workload == Workload::Flask {
            let listen = target.expect("LISTEN", READY_TIMEOUT)?;
            let port = u16::try_from(listen["port"].as_u64().context("LISTEN without port")?)?;
            let result = load::drive(
                port,
                self.plan.load_clients,
                Duration::from_secs(self.plan.load_seconds),
            )?;
            target.send("stop")?;
            Some(result)
        } else {
            None
        };
        let result = target.expect("RESULT", RESULT_TIMEOUT)?;
        let mut agent_cost = match (&agent, agent_before) {
            (Some(agent), Some((nanos, since))) => {
                // Nanoseconds, not clock ticks: the short loop's runs take
                // less of the agent's time than one tick.
                let nanos = idle::cpu_nanos(agent.pid())?.saturating_sub(nanos);
                Some(AgentCost {
                    cpu_percent: nanos as f64 / 1e9 / since.elapsed().as_secs_f64() * 100.0,
                    rss_kib: idle::status_kib(agent.pid(), "VmRSS")?,
                    peak_rss_kib: idle::status_kib(agent.pid(), "VmHWM")?,
                    probe_hits: None,
                    probe_hits_during_work: None,
                    work_cpu_seconds: 0.0,
                    accounting: None,
                    census_pause_seconds: None,
                })
            }
            _ => None,
        };
        let field = |key: &str| {
            result[key]
                .as_f64()
                .with_context(|| format!("result without {key}: {result}"))
        };
        let (mut wall, mut cpu) = (field("seconds")?, field("cpu_seconds")?);
        if let Some(load) = &load {
            ensure!(load.requests > 0, "the load generator got no answer");
            wall = load.seconds / load.requests as f64;
            cpu /= load.requests as f64;
        }
        let peak_rss_kib = field("peak_rss_kib")?;
        let kept_bytes = result["kept_bytes"].as_f64().unwrap_or(0.0);
        if let (Some(agent), Some(cost)) = (&agent, agent_cost.as_mut()) {
            // The next sample counts the run's last hits.
            thread::sleep(SAMPLED);
            let process = agent.process(pid)?;
            cost.probe_hits = probe_hits(&process);
            cost.probe_hits_during_work = cost
                .probe_hits
                .zip(hits_before_work)
                .map(|(after, before)| after.saturating_sub(before));
            cost.work_cpu_seconds = field("cpu_seconds")?;
            cost.accounting = process
                .as_ref()
                .and_then(|p| p["accounting"].as_str().map(str::to_owned));
            match census::get(
                agent.addr(),
                &format!("/api/v1/processes/{pid}/census?max_age=0&limit=1"),
            ) {
                Ok(answer) => cost.census_pause_seconds = answer["pause_seconds"].as_f64(),
                Err(e) => eprintln!("  census of {}: {e}", workload.id()),
            }
        }
        // pymem is asked while the process still runs.
        let mut found = match (&agent, workload) {
            (Some(agent), Workload::Leak) => {
                Some(found::pymem(agent, pid, kept_bytes, self.leak_line))
            }
            _ => None,
        };
        target.finish()?;
        if let Some(agent) = agent {
            agent.stop()?;
        }
        if workload == Workload::Leak && found.is_none() && tool != Tool::None {
            found = Some(self.found_offline(tool, kept_bytes)?);
        }
        Ok(Run {
            wall,
            cpu,
            peak_rss_kib,
            load,
            agent: agent_cost,
            found,
        })
    }

    /// What a launched tool's own output says about the leak, read after
    /// the process exited (its files are complete then).
    fn found_offline(&self, tool: Tool, kept_bytes: f64) -> Result<found::Found> {
        let leak = found::Expected {
            file: "leak.py",
            line: self.leak_line,
            kept_bytes,
        };
        Ok(match tool {
            Tool::Tracemalloc1 | Tool::Tracemalloc25 => found::tracemalloc(
                &fs::read_to_string(self.out.join("tracemalloc.json"))
                    .context("tracemalloc wrote no report")?,
                &leak,
            )?,
            Tool::Memray | Tool::MemrayPython => {
                let output = process::stdout_of(
                    Command::new(self.venv)
                        .arg(workspace::root().join("bench/peers/memray_leaks.py"))
                        .arg(self.out.join("memray.bin")),
                )?;
                found::memray(&output, &leak)?
            }
            Tool::Ddtrace => {
                let profile = newest_with_suffix(self.out, ".pprof")?
                    .context("ddtrace wrote no pprof file")?;
                // ddtrace writes zstd-compressed profiles.
                let bytes = fs::read(&profile)?;
                let bytes = if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    let output = Command::new("zstd")
                        .args(["-dc"])
                        .arg(&profile)
                        .stdin(Stdio::null())
                        .output()
                        .context("running zstd -dc on ddtrace's profile")?;
                    ensure!(output.status.success(), "zstd -dc {}", profile.display());
                    output.stdout
                } else {
                    bytes
                };
                found::ddtrace(&bytes, &leak)?
            }
            Tool::Mprof => found::mprof(
                &fs::read_to_string(self.out.join("mprof.dat")).context("mprof wrote no .dat")?,
                &leak,
            ),
            Tool::None | Tool::Pymem => unreachable!("no offline output"),
        })
    }
}

/// The newest file in `dir` whose name ends with `suffix`.
fn probe_hits(process: &Option<Value>) -> Option<u64> {
    process.as_ref()?["probe_hits_total"].as_u64()
}

fn newest_with_suffix(dir: &Path, suffix: &str) -> Result<Option<PathBuf>> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().ends_with(suffix) {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
            newest = Some((modified, entry.path()));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

/// A workload process speaking bench/peers/harness.py's protocol.
struct Target {
    process: Supervised,
    stdin: ChildStdin,
    lines: Receiver<(String, Value)>,
    name: String,
}

impl Target {
    fn spawn(command: &mut Command, name: &str) -> Result<Self> {
        let mut process = Supervised::spawn(command, name, Duration::from_secs(10))?;
        let child = process.child_mut();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = mpsc::channel();
        // Tools print to stdout too (memray, mprof): only PEERS- lines count.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((kind, value)) = parse_protocol_line(&line)
                    && sender.send((kind, value)).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            process,
            stdin,
            lines,
            name: name.to_owned(),
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    /// The next protocol line, which must be of `kind`.
    fn expect(&mut self, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok((got, value)) if got == kind => return Ok(value),
                Ok((got, _)) => bail!("{}: expected PEERS-{kind}, got PEERS-{got}", self.name),
                Err(_) => {
                    self.process.ensure_running()?;
                    if Instant::now() >= deadline {
                        bail!("{}: no PEERS-{kind} within {timeout:?}", self.name);
                    }
                }
            }
        }
    }

    /// Closes stdin, which lets the workload (and the tool) finish.
    fn finish(self) -> Result<()> {
        let Self {
            process,
            stdin,
            name,
            ..
        } = self;
        drop(stdin);
        let status = process.wait()?;
        ensure!(status.success(), "{name} exited with {status}");
        Ok(())
    }
}

/// `PEERS-KIND {json}` → (KIND, json).
fn parse_protocol_line(line: &str) -> Option<(String, Value)> {
    let rest = line.trim_end().strip_prefix("PEERS-")?;
    let (kind, payload) = rest.split_once(' ')?;
    Some((kind.to_owned(), serde_json::from_str(payload).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn protocol_lines_among_tool_output() {
        assert_eq!(
            parse_protocol_line("PEERS-READY {\"pid\": 42}\n"),
            Some(("READY".to_owned(), json!({"pid": 42})))
        );
        assert_eq!(
            parse_protocol_line("mprof: Sampling memory every 0.1s"),
            None
        );
        assert_eq!(parse_protocol_line("PEERS-RESULT not json"), None);
    }
}
