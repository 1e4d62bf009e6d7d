//! `cargo xtask bench idle`: the agent's own footprint (RSS, CPU) while it
//! observes many Python processes that do nothing — its baseline cost on a
//! host full of idle workers.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{Bench, agent::RunningAgent};
use crate::process::Supervised;

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct IdleArgs {
    /// Idle Python processes to start.
    #[arg(long, default_value_t = 50)]
    processes: usize,
    /// How long to measure the agent's CPU time, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

pub(super) struct Footprint {
    pub(super) time_to_observe_all: Duration,
    pub(super) rss_kib_after_discovery: u64,
    pub(super) rss_kib_at_end: u64,
    pub(super) peak_rss_kib: u64,
    pub(super) cpu_percent: f64,
    pub(super) measured_for: Duration,
}

pub fn run(args: &IdleArgs, bench: &Bench) -> Result<()> {
    let python =
        test_interpreters::pyenv("3.11").context("no pyenv 3.11 under ~/.pyenv/versions")?;
    println!("starting {} idle {}", args.processes, python.display());
    // Dropping the guards kills them, also when a step below fails.
    let sleepers = (0..args.processes)
        .map(|_| start_sleeper(&python))
        .collect::<Result<Vec<_>>>()?;
    let pids: Vec<u32> = sleepers.iter().map(Supervised::pid).collect();
    let agent_log = bench.results_dir()?.join("idle-agent.log");
    fs::write(&agent_log, "")?;
    let mut agent = RunningAgent::start(&bench.agent_binary, &agent_log, &[])?;
    let time_to_observe_all = agent.wait_until_observed(&pids, OBSERVE_TIMEOUT)?;
    println!(
        "the agent observes all {} (probes attached) after {:.1} s; measuring for {} s",
        pids.len(),
        time_to_observe_all.as_secs_f64(),
        args.seconds
    );
    let footprint = measure_footprint(&agent, time_to_observe_all, args.seconds)?;
    let observed_at_end = super::api::pids(&agent.processes()?).len();
    println!("stopping the agent");
    let stop_time = agent.stop()?;
    drop(sleepers);
    bench.write_results(
        "idle",
        results_json(args, &python, &footprint, observed_at_end, stop_time),
        &results_markdown(args, &footprint, stop_time),
    )
}

pub(super) fn start_sleeper(python: &Path) -> Result<Supervised> {
    Supervised::spawn(
        Command::new(python)
            .args(["-c", "import time; time.sleep(3600)"])
            .stdin(Stdio::null()),
        "idle python",
        Duration::from_secs(5),
    )
}

pub(super) fn measure_footprint(
    agent: &RunningAgent,
    time_to_observe_all: Duration,
    seconds: u64,
) -> Result<Footprint> {
    let pid = agent.pid();
    let rss_kib_after_discovery = status_kib(pid, "VmRSS")?;
    let ticks_before = cpu_ticks(pid)?;
    let started = Instant::now();
    thread::sleep(Duration::from_secs(seconds));
    let ticks = cpu_ticks(pid)? - ticks_before;
    let measured_for = started.elapsed();
    Ok(Footprint {
        time_to_observe_all,
        rss_kib_after_discovery,
        rss_kib_at_end: status_kib(pid, "VmRSS")?,
        peak_rss_kib: status_kib(pid, "VmHWM")?,
        cpu_percent: ticks as f64 / clock_ticks_per_second() / measured_for.as_secs_f64() * 100.0,
        measured_for,
    })
}

/// A `kB` field of /proc/PID/status, e.g. VmRSS.
pub(super) fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of all the process's threads, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("malformed /proc/{pid}/stat"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15; the first after ')' is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of the process's live threads in nanoseconds (the scheduler's
/// `schedstat`): for runs far shorter than the 10 ms clock tick of
/// `cpu_ticks`. Threads that exit meanwhile take their time with them.
pub(super) fn cpu_nanos(pid: u32) -> Result<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading /proc/{pid}/task"))?;
    Ok(tasks
        .filter_map(|task| task.ok())
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|schedstat| parse_schedstat_nanos(&schedstat))
        .sum())
}

fn parse_schedstat_nanos(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

pub(super) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn results_json(
    args: &IdleArgs,
    python: &Path,
    footprint: &Footprint,
    observed_at_end: usize,
    stop_time: Duration,
) -> Value {
    json!({
        "benchmark": "idle",
        "idle_processes": args.processes,
        "python": python,
        "processes_listed_by_agent_at_end": observed_at_end,
        "seconds_until_all_observed": footprint.time_to_observe_all.as_secs_f64(),
        "agent_rss_kib_after_discovery": footprint.rss_kib_after_discovery,
        "agent_rss_kib_at_end": footprint.rss_kib_at_end,
        "agent_peak_rss_kib": footprint.peak_rss_kib,
        "agent_cpu_percent": footprint.cpu_percent,
        "measured_seconds": footprint.measured_for.as_secs_f64(),
        "seconds_to_stop_agent": stop_time.as_secs_f64(),
    })
}

fn results_markdown(args: &IdleArgs, footprint: &Footprint, stop_time: Duration) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    format!(
        "## Agent footprint with {} idle Python processes\n\n\
         | all observed, probes attached, after | RSS after discovery | RSS at end | peak RSS | CPU over {:.0} s | stop (SIGTERM to exit) |\n\
         |---|---|---|---|---|---|\n\
         | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} % | {:.1} s |\n",
        args.processes,
        footprint.measured_for.as_secs_f64(),
        footprint.time_to_observe_all.as_secs_f64(),
        mib(footprint.rss_kib_after_discovery),
        mib(footprint.rss_kib_at_end),
        mib(footprint.peak_rss_kib),
        footprint.cpu_percent,
        stop_time.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::{cpu_nanos, parse_cpu_ticks, parse_schedstat_nanos};

    #[test]
    fn cpu_nanos_of_this_process_grow_with_work() {
        assert_eq!(parse_schedstat_nanos("123456 789 10\n"), Some(123456));
        let before = cpu_nanos(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = cpu_nanos(std::process::id()).unwrap() - before;
        assert!(spent >= 10_000_000, "{spent} ns for 30 ms of spinning");
    }

    #[test]
    fn cpu_ticks_skip_command_names_with_spaces() {
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 2 0 5";
        assert_eq!(parse_cpu_ticks(stat), Some(10));
    }
}
