//! The core observer against real Python processes, as root: heap growth
//! compared with what the interpreter itself reports.

use std::{path::Path, time::Duration};

use pymem_agent::model::{Accounting, ProcessInfo};

use crate::common::{
    self, Agent, OBSERVE_TIMEOUT, Workload, assert_within, debian_python_3_11, pyenv,
};

/// Small objects only (pymalloc): heap growth vs `sys._debugmallocstats()`.
fn small_object_leak(python: &Path) {
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(python);
    let arenas_before = work.arena_bytes();
    let m = agent.measure(&mut work, "leak_small 20 3");
    let after = &m.after;
    let truth = (work.arena_bytes() - arenas_before) as f64;
    assert!(truth > 40e6, "workload leaked only {truth} bytes of arenas");
    assert_within(m.heap_growth(), truth, 0.10, "heap growth");
    assert_within(
        m.source_growth(|h| h.arena_bytes),
        truth,
        0.02,
        "arena growth",
    );
    assert_eq!(after.python_version, work.version);
    assert!(after.leak_suspected, "{after:?}");
    let growth = after.growth_bytes_per_second;
    assert!(
        growth > 1e6,
        "growth rate {growth} B/s during a ~3 MB/s leak"
    );
}

test_each_interpreter!(small_object_leak {
    small_object_leak_pyenv_311_shared_libpython => pyenv("3.11"), "pyenv 3.11";
    small_object_leak_debian_static_stripped_pgo_311 => debian_python_3_11(), "/usr/bin/python3.11";
});

/// 8 KiB `bytes` objects leave pymalloc: growth vs their exact sizes.
#[test]
fn large_object_leak_matches_known_bytes() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(&python);
    let m = agent.measure(&mut work, "leak_bytes 20 300");
    let truth = m.leaked_bytes();
    assert!(truth > 40e6, "{}", m.result);
    assert_within(m.heap_growth(), truth, 0.10, "heap growth");
    assert_eq!(m.after.accounting, Accounting::Probes, "{:?}", m.after);
}

/// The default probe burst (`--probe-burst`).
const PROBE_BURST: f64 = 500.0;

/// A hot loop of 8 KiB blocks (5,000 a second, three probe hits each) goes
/// over the probe budget: the process moves to syscall accounting, stops
/// paying for probes within milliseconds (its hits stay near the burst, not
/// the tens of thousands its loop would cost), and its growth is still
/// measured against the blocks' exact sizes.
#[test]
fn over_budget_process_moves_to_syscall_accounting_promptly() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(&python);
    let m = agent.measure(&mut work, "leak_bytes 6 5000");
    let truth = m.leaked_bytes();
    let blocks = m.result["objects"].as_f64().unwrap();
    assert!(blocks > 20_000.0, "{}", m.result);
    assert_eq!(m.after.accounting, Accounting::Syscalls, "{:?}", m.after);
    let hits = m.after.probe_hits_total as f64;
    eprintln!("{hits} probe hits for {blocks} blocks");
    assert!(
        hits < 3.0 * PROBE_BURST,
        "{hits} probe hits for {blocks} blocks: the probes were not detached promptly after the budget ran out\n{}",
        agent.log()
    );
    assert_within(m.heap_growth(), truth, 0.10, "heap growth");
    agent.assert_logged("over its allocation-probe budget");
}

/// A quiet process whose hot loop starts after its probes are attached is
/// stopped after the first burst, not the whole one: with a burst of 2,000
/// from a first 100, the loop's probe hits stay far below 2,000 (the whole
/// burst would be spent first), and its growth is still measured.
#[test]
fn a_hot_loop_in_a_quiet_process_costs_only_the_first_burst() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&["--probe-burst", "2000", "--probe-first-burst", "100"]);
    let mut work = agent.workload_with_probes(&python);
    let m = agent.measure(&mut work, "leak_bytes 4 5000");
    assert_eq!(m.after.accounting, Accounting::Syscalls, "{:?}", m.after);
    let hits = m.after.probe_hits_total as f64;
    assert!(
        hits < 1000.0,
        "{hits} probe hits: the hot loop spent more than the first burst of 100 (and its tail)\n{}",
        agent.log()
    );
    m.assert_heap_grew_by_the_leak("heap growth");
}

/// A process that allocates slowly earns the whole burst: after 3 s of
/// 8 KiB blocks at 100 a second (~200 probe hits a second, within the
/// budget), 150 blocks at once (~300 hits, three times the first burst)
/// leave it on exact probe accounting, its growth the blocks' sizes.
#[test]
fn a_slow_allocator_earns_its_burst_and_keeps_probe_accounting() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(&python);
    let m = agent.measure(&mut work, "leak_bytes 3 100 150");
    assert_eq!(
        m.after.accounting,
        Accounting::Probes,
        "{:?}\n{}",
        m.after,
        agent.log()
    );
    let hits = m.after.probe_hits_total as f64;
    assert!(
        hits > 700.0,
        "{hits} probe hits for 450 blocks: {}",
        m.result
    );
    m.assert_heap_grew_by_the_leak("heap growth");
}

/// Kernels before 6.6 have no multi-uprobe links: the same programs as one
/// perf-event uprobe per hook count the same blocks.
#[test]
fn perf_uprobe_fallback_counts_large_blocks() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&["--perf-uprobes"]);
    let mut work = agent.workload_with_probes(&python);
    let m = agent.measure(&mut work, "leak_bytes 12 300");
    let truth = m.leaked_bytes();
    assert!(truth > 25e6, "{}", m.result);
    assert_within(m.source_growth(|h| h.raw_bytes), truth, 0.10, "raw growth");
    assert_eq!(m.after.accounting, Accounting::Probes, "{:?}", m.after);
    agent.assert_logged("one perf-event uprobe per hook");
}

/// numpy reports its buffers through PyTraceMalloc_Track.
#[test]
fn numpy_leak_matches_nbytes() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let has_numpy = std::process::Command::new(&python)
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    require!(has_numpy.then_some(()), "numpy for pyenv 3.11");
    let agent = Agent::start(&[]);
    let mut work = Workload::spawn(&python);
    // Import numpy during start-up, as programs do: its thousands of
    // allocations would use up the probe budget once probes are attached.
    work.command("leak_numpy 0.1 10");
    agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    let m = agent.measure(&mut work, "leak_numpy 20 10");
    let truth = m.leaked_bytes();
    assert!(truth > 40e6, "{}", m.result);
    assert_within(m.heap_growth(), truth, 0.10, "heap growth");
    assert_within(
        m.source_growth(|h| h.extension_bytes),
        truth,
        0.05,
        "extension buffer growth",
    );
}

/// Heavy churn, no net growth: the heap stays flat and no leak is flagged.
fn churn_is_flat(python: &Path) {
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(python);
    work.command("churn 2"); // reach steady state first
    let m = agent.measure(&mut work, "churn 20");
    let (result, after) = (&m.result, &m.after);
    assert!(result["rounds"].as_u64().unwrap() > 10, "{result}");
    let delta = m.heap_growth();
    eprintln!(
        "churn: heap delta {delta} bytes, accounting {:?}",
        after.accounting
    );
    assert!(
        delta.abs() < 4.0 * 1048576.0,
        "heap moved {delta} bytes under churn: {after:?}"
    );
    assert!(!after.leak_suspected, "{after:?}");
    let allocated = after.allocated_bytes_total as f64;
    assert!(allocated > 100e6, "churn allocations not seen: {after:?}");
}

test_each_interpreter!(churn_is_flat {
    churn_is_flat_and_not_a_leak_pyenv_311 => pyenv("3.11"), "pyenv 3.11";
    churn_is_flat_and_not_a_leak_debian_static_311 => debian_python_3_11(), "/usr/bin/python3.11";
});

/// Every series the dashboards rely on, labelled for our process.
#[test]
fn metrics_expose_the_process_with_its_labels() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    let mut work = agent.workload_with_probes(&python);
    let leaked = work.command("leak_bytes 1 100");
    agent.settled(work.pid);
    let metrics = agent.metrics();
    // The text format lists labels in name order.
    let labels = format!(
        "comm=\"python3.11\",pid=\"{}\",python_version=\"{}\"",
        work.pid, work.version
    );
    for name in [
        "pymem_heap_bytes",
        "pymem_heap_growth_bytes_per_second",
        "pymem_rss_bytes",
        "pymem_leak_suspected",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{{labels}}}")),
            "no {name}{{{labels}}} in\n{metrics}"
        );
    }
    for source in ["arena", "raw", "extension"] {
        let series = format!("pymem_allocated_bytes_total{{{labels},source=\"{source}\"}}");
        assert!(metrics.contains(&series), "no {series}");
        let series = format!("pymem_freed_bytes_total{{{labels},source=\"{source}\"}}");
        assert!(metrics.contains(&series), "no {series}");
    }
    for name in [
        "pymem_python_processes ",
        "pymem_events_lost_total ",
        "pymem_kernel_errors_total{map=\"PROC_STATS\"} ",
        "pymem_build_info{",
    ] {
        assert!(metrics.contains(name), "no {name} in\n{metrics}");
    }
    // The raw source saw at least the leaked blobs of 8225 bytes each.
    let raw_line = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "pymem_allocated_bytes_total{{{labels},source=\"raw\"}}"
            ))
        })
        .unwrap();
    let raw: f64 = raw_line.rsplit(' ').next().unwrap().parse().unwrap();
    let blobs = leaked["objects"].as_f64().unwrap();
    assert!(blobs > 50.0, "{leaked}");
    assert!(raw >= blobs * 8225.0, "{raw_line} for {leaked}");
    // The API's field names, checked on its raw JSON: each one is there.
    let api = agent.process_json(work.pid).unwrap();
    for field in [
        "pid",
        "comm",
        "cmdline",
        "python_version",
        "heap_bytes",
        "growth_bytes_per_second",
        "rss_bytes",
        "leak_suspected",
        "allocated_bytes_total",
        "freed_bytes_total",
    ] {
        assert!(!api[field].is_null(), "API object lacks {field}: {api}");
    }
    let api: ProcessInfo = serde_json::from_value(api).unwrap();
    assert!(api.cmdline.contains("memwork.py"));
    // RSS from procfs: at least the heap we counted.
    let rss = api.rss_bytes as f64;
    assert!(rss > 5e6, "{api:?}");
}

/// A process that starts after the agent is observed within a second.
#[test]
fn new_process_is_observed_within_a_second() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    let work = Workload::spawn(&python);
    let started = std::time::Instant::now();
    agent.wait_for(work.pid, Duration::from_secs(3));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "observed after {took:?}"
    );
    drop(work);
}

/// SIGTERM detaches and exits within a few seconds; exited processes drop out.
#[test]
fn exits_are_dropped_and_sigterm_is_prompt() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let mut agent = Agent::start(&[]);
    let work = Workload::spawn(&python);
    let pid = work.pid;
    agent.wait_for(pid, OBSERVE_TIMEOUT);
    drop(work);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        agent.process(pid).is_none(),
        "exited pid {pid} still listed"
    );
    // Stopping detaches every process's probes: with one perf-event uprobe
    // per hook this took seconds per process; it must not grow with them.
    let held: Vec<Workload> = (0..PROCESSES_AT_STOP)
        .map(|_| Workload::spawn(&python))
        .collect();
    for work in &held {
        agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    }
    let took = agent.stop();
    assert!(
        took < Duration::from_secs(5),
        "agent took {took:?} to exit holding the probes of {PROCESSES_AT_STOP} processes"
    );
}

/// Processes whose probes the agent holds when it is stopped.
const PROCESSES_AT_STOP: usize = 20;

/// Forked children (multiprocessing, pre-fork servers) never exec: they
/// are found through the fork tracepoint and measured on their own.
#[test]
fn forked_child_is_observed_and_measured() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&[]);
    // The parent forks once and relays the child's workload on its own
    // stdin/stdout: the child runs memwork's command loop.
    let script = format!(
        "import os, sys\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    sys.exit(0)\nexec(open({:?}).read())\n",
        common::WORKLOAD
    );
    let mut work =
        Workload::spawn_with(std::process::Command::new(&python).args(["-u", "-c", &script]));
    let child = agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    assert_ne!(
        work.pid,
        work.launcher_pid(),
        "the workload runs in the forked child"
    );
    assert_eq!(child.pid, work.pid);
    // The child holds its parent's heap: a census measures it, then the
    // counters carry it.
    agent.wait_for_baseline(work.pid, Duration::from_secs(60));
    let arenas = work.arena_bytes();
    let child = agent.settled(work.pid);
    assert!(
        child.heap.arena_bytes as f64 >= 0.9 * arenas as f64,
        "the arenas it inherited are counted: {arenas} B mapped: {child:?}"
    );
    agent
        .measure(&mut work, "leak_bytes 6 300")
        .assert_heap_grew_by_the_leak("forked child's heap growth");
}
