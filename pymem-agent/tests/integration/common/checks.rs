//! The core cases (core.rs) as checks that report instead of
//! panicking, so that one run over many interpreters records every result
//! for the support table and then fails with all of them listed.
use pymem_agent::{model::Accounting, sites::Site};
use serde_json::{Value, json};

use super::{Agent, Workload};

/// A meaningful ground-truth comparison needs more than noise.
const MIN_LEAKED_BYTES: f64 = 30e6;
/// The agent's heap must be within this of the interpreter's own figure.
const TOLERANCE: f64 = 0.10;
/// Churn may move the heap this much without being growth.
const CHURN_LIMIT_BYTES: f64 = 4.0 * 1048576.0;

/// One feature checked on one interpreter.
#[derive(Clone, Debug)]
pub struct Check {
    pub feature: &'static str,
    pub ok: bool,
    pub detail: String,
    /// False where the feature is known not to work yet (the table says
    /// so; a failure is not a test failure).
    pub expected: bool,
}

impl Check {
    pub fn new(feature: &'static str, ok: bool, detail: String) -> Self {
        Self {
            feature,
            ok,
            detail,
            expected: true,
        }
    }

    /// Marks a feature not expected to work on this build.
    pub fn not_expected(mut self) -> Self {
        self.expected = false;
        self
    }

    pub fn to_json(&self) -> Value {
        json!({
            "feature": self.feature,
            "ok": self.ok,
            "expected": self.expected,
            "detail": self.detail,
        })
    }
}

pub const SMALL_OBJECTS: &str = "heap: small objects";
pub const LARGE_BLOCKS: &str = "heap: 8 KiB blocks";
pub const EXTENSION: &str = "numpy buffers";
pub const CHURN: &str = "churn not a leak";
pub const VERSION: &str = "version";
pub const SITES: &str = "allocation sites";
pub const NAMESPACE: &str = "PID namespace";

/// Measured growth against ground truth: within 10%, and the workload
/// must have leaked enough for that to mean something.
fn ground_truth(feature: &'static str, measured: f64, truth: f64) -> Check {
    let error = (measured - truth) / truth.abs().max(1.0);
    // "-0.0%" for a few bytes under reads as a sign that is not there.
    let error = if error.abs() < 5e-4 { 0.0 } else { error };
    let detail = format!(
        "{:+.1}% of {:.1} MB (measured {:.1} MB)",
        error * 100.0,
        truth / 1e6,
        measured / 1e6
    );
    if truth < MIN_LEAKED_BYTES {
        let detail = format!("workload leaked only {:.1} MB: {detail}", truth / 1e6);
        return Check::new(feature, false, detail);
    }
    Check::new(feature, error.abs() <= TOLERANCE, detail)
}

/// Runs a paced leak command until the workload's own count says it leaked
/// enough (a starved CPU leaks less per round; at most 3 rounds), between
/// two settled readings of the agent: (agent's growth, ground truth).
fn leak_enough(
    agent: &Agent,
    work: &mut Workload,
    command: &str,
    mut leaked: impl FnMut(&mut Workload, &Value) -> f64,
) -> (f64, f64) {
    let before = agent.settled(work.pid);
    let mut truth = 0.0;
    for _ in 0..3 {
        let result = work.command(command);
        truth += leaked(work, &result);
        if truth >= MIN_LEAKED_BYTES {
            break;
        }
    }
    let after = agent.settled(work.pid);
    (super::heap(&after) - super::heap(&before), truth)
}

/// Small objects only (pymalloc): heap growth vs the interpreter's own
/// arena count (`sys._debugmallocstats()`). 10 s at 4.5 MB/s.
pub fn small_object_leak(agent: &Agent, work: &mut Workload) -> Check {
    let mut arenas = work.arena_bytes() as f64;
    let (growth, truth) = leak_enough(agent, work, "leak_small 10 4.5", |work, _| {
        let before = std::mem::replace(&mut arenas, work.arena_bytes() as f64);
        arenas - before
    });
    ground_truth(SMALL_OBJECTS, growth, truth)
}

/// 8 KiB `bytes` objects leave pymalloc: growth vs their exact sizes. 350
/// a second (34.5 MB in 12 s) stays within the default probe budget (1000
/// hits/s), so the blocks are counted one by one, not by syscall accounting.
pub fn large_object_leak(agent: &Agent, work: &mut Workload) -> Check {
    let (growth, truth) = leak_enough(agent, work, "leak_bytes 12 350", |_, result| {
        result["bytes"].as_f64().unwrap_or(0.0)
    });
    let mut check = ground_truth(LARGE_BLOCKS, growth, truth);
    let accounting = agent.process(work.pid).map(|p| p.accounting);
    check.detail += &format!(", accounting {}", accounting_name(accounting));
    check
}

/// Imports numpy if this interpreter has it. Call it before the probes are
/// attached: numpy's import allocates in a burst that would use up the probe
/// budget and move the process to syscall accounting.
pub fn import_numpy(work: &mut Workload) -> bool {
    work.command("has_module numpy")["available"] == true
}

/// numpy buffers (PyTraceMalloc_Track): extension-source growth vs nbytes
/// while the process is under exact (probe) accounting. A process that
/// went over its probe budget before or while leaking (a burst after a
/// stall: the paced loop catches up at once, as a program does after a
/// pause) no longer has extension tracking; its growth outside pymalloc
/// comes from brk/mmap, so there the whole heap's growth must match.
pub fn numpy_leak(agent: &Agent, work: &mut Workload) -> Check {
    let m = agent.measure(work, "leak_numpy 6 25");
    let truth = m.result["bytes"].as_f64().unwrap_or(0.0);
    let exact = [m.before.accounting, m.after.accounting]
        .iter()
        .all(|&accounting| accounting == Accounting::Probes);
    let (measured, what) = if exact {
        (m.source_growth(|h| h.extension_bytes), "extension buffers")
    } else {
        (m.heap_growth(), "heap (over the probe budget)")
    };
    let mut check = ground_truth(EXTENSION, measured, truth);
    check.detail += &format!(
        ", {what}, accounting {}",
        accounting_name(Some(m.after.accounting))
    );
    check
}

/// Heavy churn, no net growth: the heap stays flat and no leak is flagged.
pub fn churn_is_flat(agent: &Agent, work: &mut Workload) -> Check {
    work.command("churn 2"); // reach steady state first
    let m = agent.measure(work, "churn 10");
    let delta = m.heap_growth();
    let flagged = m.after.leak_suspected;
    let rounds = m.result["rounds"].as_u64().unwrap_or(0);
    let detail = format!(
        "heap moved {:+.2} MiB over {rounds} rounds, leak_suspected {flagged}",
        delta / 1048576.0
    );
    Check::new(
        CHURN,
        delta.abs() < CHURN_LIMIT_BYTES && !flagged && rounds > 5,
        detail,
    )
}

/// The right version, and no sign that its arena size was wrong.
pub fn version_reported(agent: &Agent, work: &Workload) -> Check {
    let listed = agent.process(work.pid);
    let reported = listed.as_ref().map_or("", |p| p.python_version.as_str());
    let arena_size_wrong = listed.as_ref().is_some_and(|p| p.arena_size_mismatch);
    let detail = format!(
        "reported {reported:?}, arena_size_mismatch {arena_size_wrong}, sys.version_info {}",
        work.version
    );
    Check::new(
        VERSION,
        reported == work.version && !arena_size_wrong,
        detail,
    )
}

/// The line of memwork.py that allocates the small-object leak.
fn small_leak_line() -> i64 {
    super::source_line(super::WORKLOAD, "small-object leak line", |l| {
        l.trim_start().starts_with("chain = [chain,")
    })
}

/// After the small-object leak: its line is among the three sites holding
/// the most live bytes (the bar; an import can hold more, e.g.
/// numpy's OpenBLAS buffers, mapped while its process started).
pub fn leak_site_on_top(agent: &Agent, work: &Workload) -> Check {
    let mut sites: Vec<Site> = agent
        .get(&format!("/api/v1/processes/{}/sites", work.pid))
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    if sites.is_empty() {
        return Check::new(SITES, false, "no sites".into());
    }
    sites.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    let is_leak = |s: &Site| s.file.ends_with("memwork.py") && s.line == small_leak_line();
    let describe = |s: &Site| {
        format!(
            "{}:{} {} ({:.1} MB live)",
            s.file.rsplit('/').next().unwrap_or(&s.file),
            s.line,
            s.function,
            s.bytes as f64 / 1e6
        )
    };
    match sites.iter().take(3).position(is_leak) {
        Some(rank) => Check::new(
            SITES,
            true,
            format!("site #{} {}", rank + 1, describe(&sites[rank])),
        ),
        None => Check::new(
            SITES,
            false,
            format!(
                "leak line not in the top 3: {}",
                sites
                    .iter()
                    .take(3)
                    .map(describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

/// The process is listed under its host pid with its namespace pid.
pub fn both_pids_reported(agent: &Agent, work: &Workload) -> Check {
    let listed = agent.process(work.pid);
    let ns_pid = listed.as_ref().map(|p| p.ns_pid);
    let detail = format!(
        "host pid {} listed: {}, ns_pid {ns_pid:?} (inside: {})",
        work.pid,
        listed.is_some(),
        work.ns_pid
    );
    let ok = ns_pid == Some(work.ns_pid) && work.ns_pid != work.pid;
    Check::new(NAMESPACE, ok, detail)
}

/// The accounting as the API writes it (`"probes"`), `null` when the
/// process is not listed: the support table's wording.
fn accounting_name(accounting: Option<Accounting>) -> Value {
    serde_json::to_value(accounting).unwrap()
}
