//! `cargo xtask bench soak`: the agent under process churn for many
//! minutes — short-lived Pythons (plain, forking, exec-ing another Python)
//! at a steady rate beside long-lived ones (leaking and idle). What it
//! shows: whether the agent's memory stays flat, its maps stay below their
//! capacity, nothing is lost or missed, and the leakers are still measured
//! right at the end.
use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::{
    Bench,
    agent::RunningAgent,
    api,
    idle::{clock_ticks_per_second, cpu_ticks, status_kib},
};
use crate::process::Supervised;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Short-lived Python processes to start per minute.
    #[arg(long, default_value_t = 1000)]
    short_per_minute: u64,
    /// Long-lived Python processes; half leak, half sleep.
    #[arg(long, default_value_t = 50)]
    long_lived: usize,
    /// What each leaker keeps per second, in KiB.
    #[arg(long, default_value_t = 100)]
    leak_kib_per_second: u64,
}

/// Keeps `rate` bytes more every second and writes how much it keeps in
/// all to `path` (the ground truth).
const LEAKER: &str = r#"
import os, sys, time
path, rate = sys.argv[1], int(sys.argv[2])
held, total = [], 0
while True:
    held.append(bytes(rate))
    total += rate
    with open(path + ".new", "w") as f:
        f.write(str(total))
    os.replace(path + ".new", path)
    time.sleep(1)
"#;

/// Capacities of the kernel maps the agent sweeps (pymem-ebpf's maps).
const MAP_CAPACITY: [(&str, u64); 6] = [
    ("STACKS", 32768),
    ("PROC_STATS", 16384),
    ("ARENAS", 1 << 18),
    ("RAW_LIVE", 1 << 20),
    ("EXT_LIVE", 1 << 18),
    ("SYS_LIVE", 1 << 16),
];

/// One look at the agent.
struct Checkpoint {
    at: Duration,
    rss_kib: u64,
    cpu_percent: f64,
    short_started: u64,
    long_observed: usize,
    events_lost: u64,
    kernel_errors: u64,
    inspections_dropped: u64,
    map_entries: BTreeMap<String, u64>,
}

struct Leaker {
    process: Supervised,
    truth: PathBuf,
}

pub fn run(args: &SoakArgs, bench: &Bench) -> Result<()> {
    ensure!(args.minutes >= 2, "a soak of under 2 minutes says nothing");
    let python =
        test_interpreters::pyenv("3.11").context("no pyenv 3.11 under ~/.pyenv/versions")?;
    let other = test_interpreters::pyenv("3.10")
        .or_else(|| test_interpreters::pyenv("3.9"))
        .unwrap_or_else(|| python.clone());
    let truths = bench.results_dir()?.join("soak-leakers");
    fs::create_dir_all(&truths)?;
    let agent_log = bench.results_dir()?.join("soak-agent.log");
    fs::write(&agent_log, "")?;
    let mut agent = RunningAgent::start(&bench.agent_binary, &agent_log, &[])?;
    let leakers = (0..args.long_lived / 2)
        .map(|n| {
            let truth = truths.join(format!("leaker-{n}"));
            let process = Supervised::spawn(
                Command::new(&python)
                    .args(["-c", LEAKER])
                    .arg(&truth)
                    .arg((args.leak_kib_per_second << 10).to_string())
                    .stdin(Stdio::null()),
                "leaking python",
                Duration::from_secs(5),
            )?;
            Ok(Leaker { process, truth })
        })
        .collect::<Result<Vec<_>>>()?;
    let sleepers = (0..args.long_lived - leakers.len())
        .map(|_| {
            Supervised::spawn(
                Command::new(&python)
                    .args(["-c", "import time; time.sleep(86400)"])
                    .stdin(Stdio::null()),
                "idle python",
                Duration::from_secs(5),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let long_pids: Vec<u32> = leakers
        .iter()
        .map(|l| l.process.pid())
        .chain(sleepers.iter().map(Supervised::pid))
        .collect();
    agent.wait_until_observed(&long_pids, Duration::from_secs(120))?;
    println!(
        "{} long-lived processes observed; starting {} short-lived ones a minute for {} min",
        long_pids.len(),
        args.short_per_minute,
        args.minutes
    );

    let started = Instant::now();
    let end = started + Duration::from_secs(args.minutes * 60);
    let interval = Duration::from_secs_f64(60.0 / args.short_per_minute as f64);
    let mut next_start = started;
    let mut next_checkpoint = started;
    let mut in_flight: Vec<Child> = Vec::new();
    let mut short_started = 0u64;
    let mut short_pids = HashSet::new();
    let mut checkpoints = Vec::new();
    let mut last_ticks = (cpu_ticks(agent.pid())?, Instant::now());
    // Heaps of the leakers and their truths at one minute in, and at the end.
    let mut at_one_minute: Option<Vec<(u64, u64)>> = None;
    while Instant::now() < end {
        let now = Instant::now();
        in_flight.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_))));
        while next_start <= now && in_flight.len() < 64 {
            let child = short_lived(&python, &other, short_started)?;
            short_pids.insert(child.id());
            in_flight.push(child);
            short_started += 1;
            next_start += interval;
        }
        if now >= next_checkpoint {
            let cpu_percent = cpu_percent_since(agent.pid(), &mut last_ticks)?;
            let checkpoint = look(
                &agent,
                &long_pids,
                now - started,
                cpu_percent,
                short_started,
            )?;
            println!(
                "{:>5.0} s: agent RSS {:.1} MiB, CPU {:.1}%, {} short started, {}/{} long observed, lost {}, kernel errors {}, maps {:?}",
                checkpoint.at.as_secs_f64(),
                checkpoint.rss_kib as f64 / 1024.0,
                checkpoint.cpu_percent,
                checkpoint.short_started,
                checkpoint.long_observed,
                long_pids.len(),
                checkpoint.events_lost,
                checkpoint.kernel_errors,
                checkpoint.map_entries
            );
            if at_one_minute.is_none() && checkpoint.at >= Duration::from_secs(60) {
                at_one_minute = Some(leaker_heaps(&agent, &leakers)?);
            }
            checkpoints.push(checkpoint);
            next_checkpoint += Duration::from_secs(30);
        }
        thread::sleep(Duration::from_millis(2).min(interval));
    }
    for mut child in in_flight {
        let _ = child.wait();
    }
    let at_end = leaker_heaps(&agent, &leakers)?;
    let cpu_percent = cpu_percent_since(agent.pid(), &mut last_ticks)?;
    let now = Instant::now();
    checkpoints.push(look(
        &agent,
        &long_pids,
        now - started,
        cpu_percent,
        short_started,
    )?);
    let peak_rss_kib = status_kib(agent.pid(), "VmHWM")?;
    let short_observed = observed_in_log(&agent_log, &short_pids);
    agent.stop()?;
    drop(sleepers);
    drop(leakers);
    let at_one_minute = at_one_minute.context("the soak ended before its first minute")?;
    let accuracy: Vec<f64> = at_one_minute
        .iter()
        .zip(&at_end)
        .map(|(&(heap0, truth0), &(heap1, truth1))| {
            let truth = truth1.saturating_sub(truth0) as f64;
            (heap1 as f64 - heap0 as f64 - truth) / truth.max(1.0)
        })
        .collect();
    let report = Report {
        args,
        checkpoints: &checkpoints,
        peak_rss_kib,
        short_started,
        short_observed,
        long_lived: long_pids.len(),
        accuracy: &accuracy,
    };
    bench.write_results("soak", report.json(), &report.markdown())
}

/// The agent's CPU use since `last` (its CPU ticks and when they were
/// read), in percent of one core; `last` becomes now.
fn cpu_percent_since(pid: u32, last: &mut (u64, Instant)) -> Result<f64> {
    let ticks = cpu_ticks(pid)?;
    let now = Instant::now();
    let percent = ticks.saturating_sub(last.0) as f64
        / clock_ticks_per_second()
        / now.duration_since(last.1).as_secs_f64().max(1e-3)
        * 100.0;
    *last = (ticks, now);
    Ok(percent)
}

/// One short-lived Python: plain, forking, or exec-ing another Python.
fn short_lived(python: &Path, other: &Path, n: u64) -> Result<Child> {
    let mut command = Command::new(python);
    match n % 3 {
        0 => command.args(["-c", "x = [bytes(1000) for _ in range(1000)]"]),
        1 => command.args([
            "-c",
            "import os\npid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0)",
        ]),
        _ => command.args([
            "-c",
            &format!(
                "import os; os.execv({other:?}, [{other:?}, '-c', 'x = [bytes(1000) for _ in range(1000)]'])",
                other = other.display().to_string()
            ),
        ]),
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a short-lived python")
}

fn look(
    agent: &RunningAgent,
    long_pids: &[u32],
    at: Duration,
    cpu_percent: f64,
    short_started: u64,
) -> Result<Checkpoint> {
    let listed: HashSet<u32> = api::pids(&agent.processes()?).into_iter().collect();
    let metrics = api::get_text(agent.addr(), "/metrics")?;
    let mut map_entries = BTreeMap::new();
    let (mut events_lost, mut kernel_errors, mut inspections_dropped) = (0, 0, 0);
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value = value.parse::<f64>().unwrap_or(0.0) as u64;
        if name == "pymem_events_lost_total" {
            events_lost = value;
        } else if name.starts_with("pymem_kernel_errors_total") {
            kernel_errors += value;
        } else if name == "pymem_inspections_dropped_total" {
            inspections_dropped = value;
        } else if let Some(map) = name
            .strip_prefix("pymem_kernel_map_entries{map=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
        {
            map_entries.insert(map.to_owned(), value);
        }
    }
    Ok(Checkpoint {
        at,
        rss_kib: status_kib(agent.pid(), "VmRSS")?,
        cpu_percent,
        short_started,
        long_observed: long_pids.iter().filter(|pid| listed.contains(pid)).count(),
        events_lost,
        kernel_errors,
        inspections_dropped,
        map_entries,
    })
}

/// Each leaker's heap as the agent has it, with what it says it keeps.
fn leaker_heaps(agent: &RunningAgent, leakers: &[Leaker]) -> Result<Vec<(u64, u64)>> {
    let processes = agent.processes()?;
    leakers
        .iter()
        .map(|leaker| {
            let pid = leaker.process.pid();
            let heap = processes
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
                .and_then(|p| p["heap_bytes"].as_u64())
                .with_context(|| format!("leaker {pid} is not observed"))?;
            let truth = fs::read_to_string(&leaker.truth)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .with_context(|| format!("leaker {pid} reported nothing"))?;
            Ok((heap, truth))
        })
        .collect()
}

/// How many of `pids` the agent's log says it observed.
fn observed_in_log(log: &Path, pids: &HashSet<u32>) -> usize {
    let text = fs::read_to_string(log).unwrap_or_default();
    let observed: HashSet<u32> = text
        .lines()
        .filter_map(|line| line.split("observing pid ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    pids.iter().filter(|pid| observed.contains(pid)).count()
}

struct Report<'a> {
    args: &'a SoakArgs,
    checkpoints: &'a [Checkpoint],
    peak_rss_kib: u64,
    short_started: u64,
    short_observed: usize,
    long_lived: usize,
    accuracy: &'a [f64],
}

impl Report<'_> {
    fn rss_at(&self, seconds: f64) -> u64 {
        self.checkpoints
            .iter()
            .find(|c| c.at.as_secs_f64() >= seconds)
            .or(self.checkpoints.last())
            .map_or(0, |c| c.rss_kib)
    }

    fn max_entries(&self) -> BTreeMap<String, u64> {
        let mut max = BTreeMap::new();
        for checkpoint in self.checkpoints {
            for (map, &entries) in &checkpoint.map_entries {
                let slot = max.entry(map.clone()).or_insert(0);
                *slot = entries.max(*slot);
            }
        }
        max
    }

    fn worst_accuracy(&self) -> f64 {
        self.accuracy.iter().map(|e| e.abs()).fold(0.0, f64::max)
    }

    fn long_missed(&self) -> usize {
        self.checkpoints
            .iter()
            .map(|c| self.long_lived - c.long_observed)
            .max()
            .unwrap_or(0)
    }

    fn json(&self) -> Value {
        let last = self.checkpoints.last();
        json!({
            "benchmark": "soak",
            "minutes": self.args.minutes,
            "short_lived_per_minute_asked": self.args.short_per_minute,
            "short_lived_started": self.short_started,
            "short_lived_observed": self.short_observed,
            "long_lived": self.long_lived,
            "agent_rss_kib_at_1_min": self.rss_at(60.0),
            "agent_rss_kib_at_end": last.map_or(0, |c| c.rss_kib),
            "agent_peak_rss_kib": self.peak_rss_kib,
            "events_lost_total": last.map_or(0, |c| c.events_lost),
            "kernel_errors_total": last.map_or(0, |c| c.kernel_errors),
            "inspections_dropped_total": last.map_or(0, |c| c.inspections_dropped),
            "max_map_entries": self.max_entries(),
            "map_capacity": MAP_CAPACITY.iter().map(|(m, c)| (m.to_string(), *c)).collect::<BTreeMap<_, _>>(),
            "long_lived_missed_at_worst": self.long_missed(),
            "leaker_growth_errors": self.accuracy,
            "checkpoints": self.checkpoints.iter().map(|c| json!({
                "seconds": c.at.as_secs_f64(),
                "agent_rss_kib": c.rss_kib,
                "agent_cpu_percent": c.cpu_percent,
                "short_lived_started": c.short_started,
                "long_lived_observed": c.long_observed,
                "events_lost_total": c.events_lost,
                "kernel_errors_total": c.kernel_errors,
                "map_entries": c.map_entries,
            })).collect::<Vec<_>>(),
        })
    }

    fn markdown(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let last = self.checkpoints.last();
        let minutes = last.map_or(0.0, |c| c.at.as_secs_f64() / 60.0);
        let mut text = format!(
            "## Soak: {:.1} min, {} short-lived Pythons ({:.0}/min; plain, forking, exec-ing another Python), {} long-lived ({} leaking)\n\n\
             | agent RSS at 1 min | at end | peak | events lost | kernel map errors | inspections dropped | long-lived missed (worst look) | short-lived observed | leakers' growth error (worst of {}) |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} of {} | {} of {} | {:.2} % |\n\n",
            minutes,
            self.short_started,
            self.short_started as f64 / minutes.max(1e-3),
            self.long_lived,
            self.accuracy.len(),
            self.accuracy.len(),
            mib(self.rss_at(60.0)),
            mib(last.map_or(0, |c| c.rss_kib)),
            mib(self.peak_rss_kib),
            last.map_or(0, |c| c.events_lost),
            last.map_or(0, |c| c.kernel_errors),
            last.map_or(0, |c| c.inspections_dropped),
            self.long_missed(),
            self.long_lived,
            self.short_observed,
            self.short_started,
            self.worst_accuracy() * 100.0,
        );
        text += "| kernel map | most entries seen | capacity |\n|---|---|---|\n";
        let max = self.max_entries();
        for (map, capacity) in MAP_CAPACITY {
            text += &format!(
                "| {map} | {} | {capacity} |\n",
                max.get(map).copied().unwrap_or(0)
            );
        }
        text += "\n| at | agent RSS | agent CPU | short-lived started | long-lived observed |\n|---|---|---|---|---|\n";
        for c in self.checkpoints {
            text += &format!(
                "| {:.0} s | {:.1} MiB | {:.1} % | {} | {} |\n",
                c.at.as_secs_f64(),
                mib(c.rss_kib),
                c.cpu_percent,
                c.short_started,
                c.long_observed
            );
        }
        text
    }
}
