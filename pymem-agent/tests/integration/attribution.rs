//! Which line holds the memory when churn and a leak share a loop (and
//! size classes), as on a real server: the sites attributed by heap state
//! against the workload's structure and against tracemalloc in a separate
//! run of the same workload.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::common::{
    Agent, describe_sites,
    interpreters::{Interpreter, Launch},
    source_line,
};
use pymem_agent::sites::{Site, state::Attribution};

const INTERLEAVED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/workloads/interleaved.py"
);
/// Seconds the loop runs: 100-450 MiB kept on the interpreters here.
const LOOP_SECONDS: &str = "4";

fn marked(what: &str) -> i64 {
    let marker = format!("# SITE: {what}");
    source_line(INTERLEAVED, what, |l| l.ends_with(&marker))
}

/// The workload under `launch`, started; killed when dropped.
struct Interleaved {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Interleaved {
    fn start(launch: &Launch, extra: &[&str]) -> Self {
        let mut command = launch.python_command(INTERLEAVED);
        let mut child = command
            .arg(LOOP_SECONDS)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        let mut workload = Self {
            child,
            stdin,
            stdout,
            pid,
        };
        assert_eq!(workload.line()["ready"], true);
        workload
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

impl Drop for Interleaved {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn share(sites: &[Site], line: i64) -> f64 {
    let total: u64 = sites.iter().map(|s| s.bytes).sum();
    let at: u64 = sites
        .iter()
        .filter(|s| s.line == line && s.file.ends_with("interleaved.py"))
        .map(|s| s.bytes)
        .sum();
    at as f64 / total.max(1) as f64
}

fn leaking_line_holds_the_memory(interpreter: Interpreter) {
    let launch = match &interpreter.launch {
        Ok(launch) => launch.clone(),
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let (leak, churn) = (marked("leak"), marked("churn"));

    // Ground truth, without pymem: tracemalloc's total per iteration (all
    // the loop keeps is the visitors). Its lines are no referee here: the
    // interpreter's dict free lists hand the churn's freed dicts to the
    // leak, and tracemalloc charges a block to its first allocation (on
    // 3.9 the churning line comes out first).
    let truth = {
        let mut traced = Interleaved::start(&launch, &["--tracemalloc"]);
        traced.line()
    };
    let tracemalloc_top = &truth["top"][0];
    let traced_leak_share = truth["top"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t[1].as_i64() == Some(leak) && t[0].as_str().unwrap().ends_with("interleaved.py"))
        .map_or(0.0, |t| t[2].as_f64().unwrap())
        / truth["total"].as_f64().unwrap();
    let per_visitor = truth["total"].as_f64().unwrap() / truth["iterations"].as_f64().unwrap();

    let agent = Agent::start(&[]);
    let mut work = Interleaved::start(&launch, &[]);
    agent.wait_for(work.pid, Duration::from_secs(15));
    let done = work.line();
    let iterations = done["iterations"].as_f64().unwrap();
    let report = agent.sites_report(work.pid);
    let samples = agent.sites(work.pid);
    let top = describe_sites(&report.sites, 5);
    assert_eq!(
        report.attribution,
        Attribution::HeapState,
        "{:?}: {top:#?}",
        report.note
    );
    let first = &report.sites[0];
    let (leak_share, churn_share) = (share(&report.sites, leak), share(&report.sites, churn));
    eprintln!(
        "{}: {iterations} iterations; heap state: leak {:.1}%, churn {:.1}%, leak {} bytes vs tracemalloc's {:.1} per iteration x {iterations} = {:.0}; allocation samples: leak {:.1}%, churn {:.1}%; tracemalloc: leak line {:.1}% of traced, its top line {tracemalloc_top}; {top:#?}",
        interpreter.id,
        leak_share * 100.0,
        churn_share * 100.0,
        first.bytes,
        per_visitor,
        per_visitor * iterations,
        share(&samples, leak) * 100.0,
        share(&samples, churn) * 100.0,
        traced_leak_share * 100.0,
    );
    assert_eq!(
        (first.function.as_str(), first.line),
        ("remember_visitor", leak),
        "{top:#?}"
    );
    assert_eq!(first.holder.as_deref(), Some("__main__.VISITORS"));
    assert!(leak_share >= 0.80, "leak holds {leak_share:.3}: {top:#?}");
    assert!(
        churn_share <= 0.10,
        "churn holds {churn_share:.3}: {top:#?}"
    );
    // The leak's size: what tracemalloc traced per iteration.
    let expected = per_visitor * iterations;
    let error = (first.bytes as f64 - expected).abs() / expected;
    assert!(
        error <= 0.05,
        "leak {} bytes vs {expected:.0} from tracemalloc: {:.1}% off",
        first.bytes,
        error * 100.0
    );
}

#[test]
fn leaking_line_holds_the_memory_pyenv_39() {
    leaking_line_holds_the_memory(Interpreter::pyenv("3.9"));
}

#[test]
fn leaking_line_holds_the_memory_pyenv_311() {
    leaking_line_holds_the_memory(Interpreter::pyenv("3.11"));
}

#[test]
fn leaking_line_holds_the_memory_pyenv_313() {
    leaking_line_holds_the_memory(Interpreter::pyenv("3.13"));
}

#[test]
fn leaking_line_holds_the_memory_debian_static_311() {
    leaking_line_holds_the_memory(Interpreter::debian_host_311());
}

#[test]
fn leaking_line_holds_the_memory_sid_314() {
    leaking_line_holds_the_memory(Interpreter::debian_rootfs("sid", "3.14", false));
}

/// A big temporary, built and dropped: while it is held its line is the
/// top site (a frame local holds it); once released the heap history keeps
/// the peak and no site holds it any more.
#[test]
fn a_released_peak_leaves_no_site() {
    let python = require!(crate::common::pyenv("3.11"), "pyenv 3.11");
    const PEAK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/peak.py");
    let peak_line = source_line(PEAK, "SITE: peak", |l| l.ends_with("# SITE: peak"));
    // Its process starts after the agent: no baseline censuses of the
    // other tests' processes to queue its own censuses behind.
    let agent = Agent::start(&["--census-baseline", "false"]);
    let mut child = Command::new(&python)
        .arg(PEAK)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut expect = |what: &str| {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), what);
    };
    // Built once the agent observes it: a heap built while the agent was
    // still attaching the interpreter's arena probes (its first scan, on a
    // loaded CI) would be only partly counted, as heap since attach.
    expect("ready");
    agent.wait_for(pid, Duration::from_secs(15));
    writeln!(stdin).unwrap();
    expect("built");
    let held = agent.sites_report(pid);
    let heap_held = agent.settled(pid).heap_bytes;
    writeln!(stdin).unwrap();
    expect("released");
    let released = agent.sites_report(pid);
    let after = agent.settled(pid);
    let heap_released = after.heap_bytes;
    let peak_in_history = after
        .heap_history
        .iter()
        .map(|&(_, b)| b)
        .max()
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    let top = |sites: &[Site]| describe_sites(sites, 3);
    eprintln!(
        "heap {heap_held} B held, {heap_released} B released; held: {:#?}; released: {:#?}",
        top(&held.sites),
        top(&released.sites)
    );
    assert!(
        peak_in_history > heap_released + (60 << 20),
        "the history lost the peak: {peak_in_history} B, {heap_released} B after"
    );
    let first = &held.sites[0];
    assert_eq!(
        (first.function.as_str(), first.line),
        ("build_report", peak_line)
    );
    assert!(first.bytes > 50 << 20, "{first:?}");
    assert!(
        first
            .holder
            .as_deref()
            .is_some_and(|h| h.ends_with("/ build_report / rows")),
        "{first:?}"
    );
    assert!(
        released
            .sites
            .iter()
            .all(|s| s.line != peak_line && s.bytes < 1 << 20),
        "{:#?}",
        top(&released.sites)
    );
}
