//! Every CPython build this machine can run, 3.8–3.14: pyenv's shared-lib
//! builds with symbols, Debian's static stripped PGO/LTO builds on the host
//! and inside Debian root filesystems (chroot, one in its own PID
//! namespace). Each is checked against the interpreter's own ground truth,
//! and every result is written to target/support/ for the README's table.

use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::common::{
    Agent,
    checks::{self, Check},
    interpreters::{Interpreter, Launch},
    support::{self, CaseResult},
};

const GROUP: &str = "matrix";

/// Discovery plus the harness's 2 s probe delay, with another workload
/// running on a 2-core box.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Cases run this many at a time against one agent (2 cores).
const PARALLEL_CASES: usize = 2;

fn interpreters() -> Vec<Interpreter> {
    let mut all: Vec<Interpreter> = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
        .into_iter()
        .map(Interpreter::pyenv)
        .collect();
    all.push(Interpreter::debian_host_311());
    all.push(Interpreter::debian_rootfs("bullseye", "3.9", false));
    // Trixie runs like a container: its own root and its own PID namespace.
    all.push(Interpreter::debian_rootfs("trixie", "3.13", true));
    all.push(Interpreter::debian_rootfs("sid", "3.14", false));
    all
}

/// `PYMEM_MATRIX=sid,pyenv-3.8` runs only the cases whose ids contain one
/// of the words (when working on one interpreter).
fn selected(interp: &Interpreter) -> bool {
    std::env::var("PYMEM_MATRIX").map_or(true, |only| {
        only.split(',').any(|word| interp.id.contains(word.trim()))
    })
}

/// Python stacks are required for these minors (3.14's offsets come from
/// the binary's own `_Py_DebugOffsets`); sites elsewhere are recorded, not
/// required.
fn stacks_expected(minor: &str) -> bool {
    matches!(minor, "3.8" | "3.9" | "3.10" | "3.11" | "3.14")
}

/// Every core case on one workload process, in an order that keeps the
/// process under exact (probe) accounting until churn, which is meant to
/// exceed the probe budget: numpy (few probe hits) before the 8 KiB blocks
/// (one hit per block), so the budget's burst is spent last.
fn check_interpreter(agent: &Agent, interp: &Interpreter, launch: &Launch) -> Vec<Check> {
    let mut work = launch.spawn_workload();
    let has_numpy = checks::import_numpy(&mut work);
    agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    let mut found = Vec::new();
    if matches!(launch, Launch::ChrootPidNamespace { .. }) {
        found.push(checks::both_pids_reported(agent, &work));
    }
    found.push(checks::small_object_leak(agent, &mut work));
    let sites = checks::leak_site_on_top(agent, &work);
    found.push(if stacks_expected(&interp.minor) {
        sites
    } else {
        sites.not_expected()
    });
    if has_numpy {
        found.push(checks::numpy_leak(agent, &mut work));
    }
    found.push(checks::large_object_leak(agent, &mut work));
    found.push(checks::churn_is_flat(agent, &mut work));
    found.push(checks::version_reported(agent, &work));
    found
}

fn run_case(agent: &Agent, interp: &Interpreter) -> CaseResult {
    let mut result = CaseResult {
        id: interp.id.clone(),
        python: interp.minor.clone(),
        build: interp.build.clone(),
        runs_as: String::new(),
        not_run: None,
        checks: Vec::new(),
    };
    let launch = match &interp.launch {
        Ok(launch) => launch,
        Err(reason) => {
            eprintln!("SKIP: {}: {reason}", interp.id);
            result.not_run = Some(reason.clone());
            return result;
        }
    };
    result.runs_as = launch.describe();
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        check_interpreter(agent, interp, launch)
    }));
    match outcome {
        Ok(found) => result.checks = found,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            result.checks.push(Check::new("run", false, message));
        }
    }
    if let Some(version) = result.checks.iter().find(|c| c.feature == checks::VERSION) {
        // "reported \"3.9.2\", sys.version_info 3.9.2": keep the real one.
        if let Some(real) = version.detail.rsplit(' ').next() {
            result.python = real.to_string();
        }
    }
    for check in &result.checks {
        let mark = match (check.ok, check.expected) {
            (true, _) => "ok",
            (false, true) => "FAILED",
            (false, false) => "not supported",
        };
        eprintln!(
            "{} ({}, {}): {}: {mark}: {}",
            result.id, result.python, result.runs_as, check.feature, check.detail
        );
    }
    eprintln!("{}: {:.0} s", result.id, started.elapsed().as_secs_f64());
    result
}

/// All interpreters against ONE agent, two at a time; every result is
/// written before the test fails with the full list of failures.
#[test]
fn every_interpreter_matches_ground_truth() {
    let cases: Vec<Interpreter> = interpreters().into_iter().filter(selected).collect();
    if std::env::var_os("PYMEM_MATRIX").is_none() {
        support::clear_group(GROUP);
    }
    let agent = Agent::start(&[]);
    let queue = Mutex::new(cases.into_iter().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_CASES {
            scope.spawn(|| {
                while let Some(interp) = queue.lock().unwrap().pop_front() {
                    let result = run_case(&agent, &interp);
                    result.write(GROUP);
                    results.lock().unwrap().push(result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let failures: Vec<String> = results.iter().flat_map(CaseResult::failures).collect();
    let ran = results.iter().filter(|r| r.not_run.is_none()).count();
    assert!(ran > 0, "no interpreter could be run here");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n--- agent log (tail) ---\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&agent.log(), 60)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
