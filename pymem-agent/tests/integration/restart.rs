//! The agent killed with SIGKILL under load and started again: it leaves
//! no BPF programs, links or uprobes behind, re-attaches to every process
//! and measures them right again.
use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::{Agent, OBSERVE_TIMEOUT, Workload, pyenv, stdout_of};

/// Baseline censuses of processes found running queue one at a time
/// behind every other Python process the agent finds.
const BASELINE_TIMEOUT: Duration = Duration::from_secs(90);
const BACK_TO_BACK: &[&str] = &["--census-background-cpu", "100"];

/// The BPF objects one process holds, from its file descriptors:
/// `anon_inode:bpf_link`, `anon_inode:bpf-prog` and perf events, with the
/// ids their fdinfo gives.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Owned {
    links: BTreeSet<u64>,
    programs: BTreeSet<u64>,
    perf_events: usize,
}

impl Owned {
    fn of(pid: u32) -> Owned {
        let mut owned = Owned::default();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return owned;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let id = |key: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            match target.to_string_lossy().as_ref() {
                "anon_inode:bpf_link" => owned.links.extend(id("link_id:")),
                "anon_inode:bpf-prog" => owned.programs.extend(id("prog_id:")),
                "anon_inode:[perf_event]" => owned.perf_events += 1,
                _ => {}
            }
        }
        owned
    }
}

/// What bpftool lists system-wide: link ids, program ids, and the pids
/// holding perf events with programs attached.
struct SystemWide {
    links: BTreeSet<u64>,
    programs: BTreeSet<u64>,
    perf_pids: BTreeSet<u64>,
}

fn bpftool_json(what: &str) -> Vec<Value> {
    let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("bpftool is not installed: `cargo xtask setup` installs it");
    let out = stdout_of(Command::new(bpftool).args(["-j", what, "show"]));
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool {what}: {e}: {out}"))
}

impl SystemWide {
    fn now() -> SystemWide {
        let ids = |what: &str, key: &str| {
            bpftool_json(what)
                .iter()
                .filter_map(|v| v[key].as_u64())
                .collect::<BTreeSet<u64>>()
        };
        SystemWide {
            links: ids("link", "id"),
            programs: ids("prog", "id"),
            perf_pids: ids("perf", "pid"),
        }
    }
}

/// The uprobes defined through tracefs, one line each (empty where the
/// kernel's uprobe PMU and multi-uprobe links are used instead).
fn tracefs_uprobes() -> Vec<String> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| std::fs::read_to_string(format!("{root}/uprobe_events")).ok())
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Tracefs uprobes named for `pid` (aya names the events it creates after
/// the creating process).
fn tracefs_uprobes_of(pid: u32) -> Vec<String> {
    let marker = format!("_{pid}_");
    tracefs_uprobes()
        .into_iter()
        .filter(|line| line.contains(&marker) || line.ends_with(&format!("_{pid}")))
        .collect()
}

/// What an agent observes: each process with its accounting and binary.
fn observed(agent: &Agent) -> BTreeSet<(u32, String, String)> {
    agent
        .processes()
        .into_iter()
        .map(|p| (p.pid, format!("{:?}", p.accounting), p.binary))
        .collect()
}

/// Waits until every workload has its probes; then the agent's BPF objects
/// and what it observes, once both stay put for a second.
fn attached_to_all(
    agent: &Agent,
    workloads: &[&Workload],
) -> (Owned, BTreeSet<(u32, String, String)>) {
    for work in workloads {
        agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (Owned::of(agent.child_pid()), observed(agent));
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = (Owned::of(agent.child_pid()), observed(agent));
        if now == last && !now.0.links.is_empty() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's BPF objects never settled: {last:?} then {now:?}"
        );
        last = now;
    }
}

/// Every id of `owned` is gone from the system lists (the kernel frees
/// programs a moment after their last reference), and no perf event or
/// tracefs uprobe of `pid` remains.
fn nothing_left_of(pid: u32, owned: &Owned) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let system = SystemWide::now();
        let links: Vec<_> = owned.links.intersection(&system.links).collect();
        let programs: Vec<_> = owned.programs.intersection(&system.programs).collect();
        let perf = system.perf_pids.contains(&u64::from(pid));
        let uprobes = tracefs_uprobes_of(pid);
        if links.is_empty() && programs.is_empty() && !perf && uprobes.is_empty() {
            eprintln!(
                "after SIGKILL: none of the agent's {} links and {} programs remain",
                owned.links.len(),
                owned.programs.len()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind by the killed agent {pid}: links {links:?}, programs {programs:?}, perf events {perf}, tracefs uprobes {uprobes:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A memwork.py that keeps allocating small objects in the background for
/// `seconds` (its answer is never read).
fn background_loader(python: &Path, seconds: u32) -> Workload {
    let mut work = Workload::spawn(python);
    work.send(&format!("leak_small {seconds} 1"));
    work
}

#[test]
fn agent_killed_under_load_restarts_cleanly_and_measures_right() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let uprobes_before = tracefs_uprobes();
    let loaders: Vec<Workload> = (0..3).map(|_| background_loader(&python, 120)).collect();
    let mut leaker = Workload::spawn(&python);
    let all: Vec<&Workload> = loaders.iter().chain([&leaker]).collect();

    // Baselines back to back: the test is of the restart, and at the
    // default pace the debug build's censuses of every Python process of
    // a busy CI (the other tests' too) queue for minutes.
    let mut first = Agent::start(BACK_TO_BACK);
    let first_pid = first.child_pid();
    let (during_first, observed_first) = attached_to_all(&first, &all);
    eprintln!("first agent {first_pid}: {during_first:?}");
    for work in &all {
        first.wait_for_baseline(work.pid, BASELINE_TIMEOUT);
    }
    drop(all);
    first
        .measure(&mut leaker, "leak_bytes 4 300")
        .assert_heap_grew_by_the_leak("heap growth under the first agent");

    first.kill();
    assert!(
        !Path::new(&format!("/proc/{first_pid}")).exists(),
        "the killed agent is still there"
    );
    nothing_left_of(first_pid, &during_first);
    assert_eq!(
        tracefs_uprobes_of(first_pid),
        Vec::<String>::new(),
        "tracefs uprobes before: {uprobes_before:?}"
    );

    let second = Agent::start(BACK_TO_BACK);
    let all: Vec<&Workload> = loaders.iter().chain([&leaker]).collect();
    let (during_second, observed_second) = attached_to_all(&second, &all);
    eprintln!("second agent {}: {during_second:?}", second.child_pid());
    assert_eq!(
        during_second.programs.len(),
        during_first.programs.len(),
        "the second agent loaded other programs than the first"
    );
    // Links are per binary and per process: the same for the same
    // processes. (Where other Python processes came or went in between,
    // as on a shared machine, only the programs compare.)
    if observed_second == observed_first {
        assert_eq!(
            (during_second.links.len(), during_second.perf_events),
            (during_first.links.len(), during_first.perf_events),
            "the second agent holds other links than the first for the same processes"
        );
    } else {
        eprintln!(
            "NOTE: other processes came or went between the agents; links not compared: {observed_first:?} then {observed_second:?}"
        );
    }
    for work in &all {
        let p = second.wait_for_baseline(work.pid, BASELINE_TIMEOUT);
        assert!(p.heap_bytes > 0, "{p:?}");
    }
    drop(all);
    second
        .measure(&mut leaker, "leak_bytes 6 300")
        .assert_heap_grew_by_the_leak("heap growth after the restart");
}
