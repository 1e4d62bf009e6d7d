//! The true heap of processes that started before the agent: a census
//! measures what they held, the counters keep it up to date after. Ground
//! truth is the process's own: `sys._debugmallocstats()` arenas plus the
//! `sys.getsizeof` of what it holds outside pymalloc.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use pymem_agent::model::HeapBaseline;

use crate::common::{
    Agent, OBSERVE_TIMEOUT, Workload, assert_within, debian_python_3_11, heap, pyenv,
};

/// How long a census of a ~100 MiB heap may take on a loaded machine.
const BASELINE_TIMEOUT: Duration = Duration::from_secs(90);

/// pyenv 3.11 (symbols) and Debian's stripped static PGO 3.11 (none).
fn pythons() -> Vec<PathBuf> {
    let mut found = Vec::new();
    match pyenv("3.11") {
        Some(python) => found.push(python),
        None => eprintln!("SKIP: no pyenv 3.11"),
    }
    match debian_python_3_11() {
        Some(python) => found.push(python),
        None => eprintln!("SKIP: no Debian python3.11"),
    }
    found
}

/// A workload that holds what `hold` makes it hold, and its ground truth:
/// arena bytes plus the bytes it holds outside pymalloc.
struct Held {
    work: Workload,
    outside_bytes: u64,
}

impl Held {
    fn start(python: &Path, hold: &str) -> Held {
        let mut work = Workload::spawn(python);
        let answer = work.command(hold);
        let outside_bytes = answer["outside_bytes"].as_u64().expect("outside_bytes");
        Held {
            work,
            outside_bytes,
        }
    }

    fn hold(&mut self, hold: &str) {
        let answer = self.work.command(hold);
        self.outside_bytes = answer["outside_bytes"].as_u64().expect("outside_bytes");
    }

    fn truth(&mut self) -> f64 {
        (self.work.arena_bytes() + self.outside_bytes) as f64
    }
}

/// Processes holding `hold` before the agent starts: their `heap_bytes` is
/// within 10% of their own count once censused, and still after `more`.
fn heap_of_processes_older_than_the_agent(hold: &str, more: &str, what: &str) {
    let mut held: Vec<(PathBuf, Held)> = pythons()
        .into_iter()
        .map(|python| {
            let held = Held::start(&python, hold);
            (python, held)
        })
        .collect();
    assert!(!held.is_empty(), "no interpreter to test with");
    // Back to back: the second baseline waits otherwise for 3x the first
    // census's wall time (the 25 % pace), which on a loaded CI with the
    // debug build passed the timeout. The pace has its own unit tests.
    let agent = Agent::start(&["--census-background-cpu", "100"]);
    for (python, held) in &mut held {
        let label = format!("{what}, {}", python.display());
        let p = agent.wait_for_baseline(held.work.pid, BASELINE_TIMEOUT);
        let p = agent.settled(p.pid);
        let truth = held.truth();
        eprintln!(
            "{label}: heap {:?}, before attach {} B",
            p.heap, p.heap.before_attach_bytes
        );
        assert_within(heap(&p), truth, 0.10, &format!("{label}: heap at attach"));
        // From here the counters carry it: more of the same, then check.
        held.hold(more);
        let p = agent.settled(p.pid);
        assert_eq!(p.heap_baseline, HeapBaseline::Census);
        let truth = held.truth();
        assert_within(heap(&p), truth, 0.10, &format!("{label}: heap after more"));
    }
    // A process started after the agent is observed from its start: no
    // census is needed, and none is taken for it.
    let python = &held[0].0;
    let young = Workload::spawn(python);
    let p = agent.settled(agent.wait_for(young.pid, OBSERVE_TIMEOUT).pid);
    assert_eq!(p.heap_baseline, HeapBaseline::Observed, "{p:?}");
    assert_eq!(p.heap.before_attach_bytes, 0);
}

#[test]
fn small_object_heap_of_a_process_older_than_the_agent() {
    heap_of_processes_older_than_the_agent(
        "hold_dicts 500000",
        "hold_dicts 200000",
        "500,000 small dicts",
    );
}

#[test]
fn large_block_heap_of_a_process_older_than_the_agent() {
    heap_of_processes_older_than_the_agent(
        "hold_blobs 5000 8192",
        "hold_blobs 2000 8192",
        "5,000 8 KiB blobs",
    );
}

#[test]
fn without_baseline_censuses_old_processes_say_their_heap_is_since_attach() {
    let python = pythons().into_iter().next().expect("an interpreter");
    let held = Held::start(&python, "hold_dicts 100000");
    let agent = Agent::start(&["--census-baseline", "false"]);
    let p = agent.settled(agent.wait_for(held.work.pid, OBSERVE_TIMEOUT).pid);
    std::thread::sleep(Duration::from_secs(2));
    let p = agent.settled(p.pid);
    assert_eq!(p.heap_baseline, HeapBaseline::SinceAttach, "{p:?}");
    assert_eq!(p.heap.before_attach_bytes, 0);
    let json = agent.process_json(p.pid).expect("the process's JSON");
    assert_eq!(json["heap_baseline"], "since_attach", "{json}");
}
