//! The scaling section of `bench peers`: the agent's CPU and RSS with 10,
//! 100 and 500 idle Python processes and with 50 busy ones, how soon it
//! observes a new process, and census times for ~100 MiB and ~1 GiB heaps
//! (bench idle's and bench census's measurements, reused).
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    super::{Bench, agent::RunningAgent, api, census, idle, median},
    Plan,
};
use crate::process::Supervised;

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Allocates and frees a few MiB a second, with pauses: busy, not spinning.
const BUSY: &str = "import time\nwhile True:\n    keep = [{'i': i, 's': 'x%d' % i} for i in range(5000)]\n    blob = bytes(65536)\n    time.sleep(0.05)\n";

pub fn run(bench: &Bench, plan: &Plan) -> Result<Value> {
    let python =
        test_interpreters::pyenv("3.11").context("no pyenv 3.11 under ~/.pyenv/versions")?;
    let log = bench.results_dir()?.join("peers-scaling-agent.log");
    fs::write(&log, "")?;
    let seconds = if plan.quick { 10 } else { 20 };
    let idle_counts: &[usize] = if plan.quick {
        &[10, 100]
    } else {
        &[10, 100, 500]
    };
    let mut processes = Vec::new();
    for &n in idle_counts {
        processes.push(measure(bench, &python, &log, n, false, seconds)?);
    }
    processes.push(measure(bench, &python, &log, 50, true, seconds)?);
    let heaps: &[u64] = if plan.quick { &[100] } else { &[100, 1024] };
    let rounds = if plan.quick { 1 } else { 3 };
    let mut censuses = Vec::new();
    for &heap_mib in heaps {
        let result = census::measure_heap(bench, &python, &census::workload(), heap_mib, rounds)?;
        censuses.push(match census::medians(&result) {
            Some([pause, copy, parse, total, copied]) => json!({
                "heap_mib": heap_mib,
                "pause_seconds": pause,
                "copy_seconds": copy,
                "parse_seconds": parse,
                "total_seconds": total,
                "copied_bytes": copied,
                "agent_peak_rss_kib": result.agent_peak_rss_kib,
            }),
            None => json!({
                "heap_mib": heap_mib,
                "error": result.censuses.iter().find_map(|c| c.as_ref().err()).cloned()
                    .unwrap_or_else(|| "no census".to_owned()),
            }),
        });
    }
    Ok(json!({"processes": processes, "census": censuses}))
}

/// `n` processes (idle sleepers, or busy allocators) started before the
/// agent; how long and how much CPU it takes to catch up with them (observe
/// each, and census each once for its heap baseline, paced), its footprint
/// after that, and how soon it then observes a new one.
fn measure(
    bench: &Bench,
    python: &Path,
    log: &Path,
    n: usize,
    busy: bool,
    seconds: u64,
) -> Result<Value> {
    let label = format!("{n} {}", if busy { "busy" } else { "idle" });
    println!("scaling: {label} Python processes");
    let workers = (0..n)
        .map(|_| {
            if busy {
                Supervised::spawn(
                    Command::new(python).args(["-c", BUSY]).stdin(Stdio::null()),
                    "busy python",
                    Duration::from_secs(5),
                )
            } else {
                idle::start_sleeper(python)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let pids: Vec<u32> = workers.iter().map(Supervised::pid).collect();
    let mut agent = RunningAgent::start(&bench.agent_binary, log, &[])?;
    let started = Instant::now();
    let observed_after = agent.wait_until_observed(&pids, OBSERVE_TIMEOUT)?;
    let baselines_after = wait_for_baselines(&agent, &pids, started)?;
    let catch_up_cpu_seconds =
        idle::cpu_ticks(agent.pid())? as f64 / idle::clock_ticks_per_second();
    let footprint = idle::measure_footprint(&agent, observed_after, seconds)?;
    let new_process = if busy {
        None
    } else {
        let mut times = Vec::new();
        for _ in 0..5 {
            times.push(time_to_observe_new(&agent, python)?.as_secs_f64() * 1e3);
        }
        Some(median(&times))
    };
    println!(
        "  observed all after {:.1} s, their baselines after {:.1} s ({:.1} s of agent CPU); then agent {:.2} % CPU, {:.1} MiB RSS{}",
        observed_after.as_secs_f64(),
        baselines_after.as_secs_f64(),
        catch_up_cpu_seconds,
        footprint.cpu_percent,
        footprint.rss_kib_at_end as f64 / 1024.0,
        new_process.map_or(String::new(), |ms| format!(
            "; a new process listed after {ms:.0} ms"
        ))
    );
    agent.stop()?;
    drop(workers);
    Ok(json!({
        "label": label,
        "processes": n,
        "busy": busy,
        "seconds_until_all_observed": observed_after.as_secs_f64(),
        "seconds_until_all_baselines": baselines_after.as_secs_f64(),
        "catch_up_cpu_seconds": catch_up_cpu_seconds,
        "agent_cpu_percent": footprint.cpu_percent,
        "agent_rss_kib_at_end": footprint.rss_kib_at_end,
        "agent_peak_rss_kib": footprint.peak_rss_kib,
        "measured_seconds": footprint.measured_for.as_secs_f64(),
        "new_process_observed_ms": new_process,
    }))
}

/// From the agent's start until each of `pids` has its heap baseline from a
/// census (`heap_baseline` no longer `since_attach`).
fn wait_for_baselines(agent: &RunningAgent, pids: &[u32], started: Instant) -> Result<Duration> {
    loop {
        let waiting = api::pids_without_baseline(&agent.processes()?)
            .into_iter()
            .filter(|pid| pids.contains(pid))
            .count();
        if waiting == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > OBSERVE_TIMEOUT {
            bail!("{waiting} processes still without a baseline census after {OBSERVE_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// From spawning a Python process to the agent's API listing it.
fn time_to_observe_new(agent: &RunningAgent, python: &Path) -> Result<Duration> {
    let started = Instant::now();
    let sleeper = idle::start_sleeper(python)?;
    let pid = sleeper.pid();
    while started.elapsed() < Duration::from_secs(30) {
        if api::pids(&agent.processes()?).contains(&pid) {
            return Ok(started.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    bail!("the agent did not list the new process {pid} within 30 s")
}
