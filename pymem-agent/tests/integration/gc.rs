//! Garbage collections counted by the collector's probes (USDT probes on
//! Debian's builds, the collector function on pyenv's), against the
//! process's own `gc.get_stats()`.
use std::time::{Duration, Instant};

use pymem_agent::model::{GcInfo, GcState};

use crate::common::{Agent, OBSERVE_TIMEOUT, interpreters::Interpreter};

/// Reference cycles made and dropped a second: a few dozen collections a
/// second, far below the probe budget.
const CYCLES_PER_SECOND: &str = "20000";
const CHURN_SECONDS: &str = "3";

fn counted(agent: &Agent, pid: u32) -> GcInfo {
    agent.process(pid).expect("observed").gc
}

fn collections_match_gc_get_stats(interpreter: Interpreter) {
    let launch = match &interpreter.launch {
        Ok(launch) => launch.clone(),
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let agent = Agent::start(&[]);
    let mut work = launch.spawn_workload();
    agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    let deadline = Instant::now() + OBSERVE_TIMEOUT;
    let before = loop {
        let gc = counted(&agent, work.pid);
        if gc.state == GcState::Counting || Instant::now() > deadline {
            break gc;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        before.state,
        GcState::Counting,
        "{before:?}\n{}",
        agent.log()
    );
    // The process idles on stdin: no collection between these two reads.
    let truth_before = work.command("gc_stats");
    let truth_after = work.command(&format!("gc_churn {CHURN_SECONDS} {CYCLES_PER_SECOND}"));
    // Two sample intervals for the counters to be published.
    std::thread::sleep(Duration::from_millis(600));
    let after = counted(&agent, work.pid);
    let truth = |value: &serde_json::Value, generation: usize| {
        value["collections"][generation].as_u64().unwrap()
    };
    let mut figures = Vec::new();
    for generation in 0..3 {
        let expected = truth(&truth_after, generation) - truth(&truth_before, generation);
        let seen = after.collections[generation] - before.collections[generation];
        figures.push(format!("gen{generation} {seen} vs {expected}"));
        let error = seen.abs_diff(expected) as f64 / expected.max(1) as f64;
        assert!(
            error <= 0.05,
            "generation {generation}: {seen} collections counted, gc.get_stats() says {expected}; {after:?}"
        );
    }
    let young = truth(&truth_after, 0) - truth(&truth_before, 0);
    assert!(young >= 30, "too few collections to judge: {young}");
    let unreachable = truth_after["unreachable"].as_u64().unwrap()
        - truth_before["unreachable"].as_u64().unwrap();
    let seen_unreachable = after.unreachable_objects - before.unreachable_objects;
    let error = seen_unreachable.abs_diff(unreachable) as f64 / unreachable.max(1) as f64;
    assert!(
        error <= 0.05,
        "{seen_unreachable} unreachable objects counted, gc.get_stats() says {unreachable}"
    );
    assert!(after.seconds > before.seconds, "{after:?}");
    eprintln!(
        "{} ({}): {}; unreachable {seen_unreachable} vs {unreachable}; {:.4} s collecting",
        interpreter.id,
        after.source.as_deref().unwrap_or("?"),
        figures.join(", "),
        after.seconds - before.seconds
    );
    let metrics = agent.metrics();
    let series = "pymem_gc_collections_total{comm=";
    assert!(
        metrics.lines().any(|l| l.starts_with(series)
            && l.contains(&format!("pid=\"{}\"", work.pid))
            && l.contains("generation=\"0\"")),
        "no {series}… for pid {} in\n{metrics}",
        work.pid
    );
}

#[test]
fn collections_match_gc_get_stats_debian_static_311() {
    collections_match_gc_get_stats(Interpreter::debian_host_311());
}

#[test]
fn collections_match_gc_get_stats_pyenv_311() {
    collections_match_gc_get_stats(Interpreter::pyenv("3.11"));
}

#[test]
fn collections_match_gc_get_stats_pyenv_39() {
    collections_match_gc_get_stats(Interpreter::pyenv("3.9"));
}

#[test]
fn collections_match_gc_get_stats_trixie_313() {
    collections_match_gc_get_stats(Interpreter::debian_rootfs("trixie", "3.13", false));
}

/// pyenv's 3.13 has neither USDT probes nor a collector function that
/// knows its generation on entry: it says so instead of counting wrong.
#[test]
fn a_build_without_a_way_to_see_its_collector_says_why() {
    let python = require!(crate::common::pyenv("3.13"), "pyenv 3.13");
    let agent = Agent::start(&[]);
    let mut work = crate::common::Workload::spawn(&python);
    agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    let gc = counted(&agent, work.pid);
    assert_eq!(gc.state, GcState::Unavailable, "{gc:?}");
    let reason = gc.reason.unwrap_or_default();
    assert!(
        reason.contains("no gc__start/gc__done USDT probes"),
        "{reason}"
    );
    let _ = work.command("gc_churn 1 20000");
    assert!(
        !agent
            .metrics()
            .lines()
            .any(|l| l.starts_with("pymem_gc_collections_total")
                && l.contains(&format!("pid=\"{}\"", work.pid))),
        "an unavailable collector has no series"
    );
}

#[test]
fn collections_match_gc_get_stats_sid_314() {
    collections_match_gc_get_stats(Interpreter::debian_rootfs("sid", "3.14", false));
}
