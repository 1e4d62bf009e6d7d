//! What holds the memory, against real Python processes: the holders of a
//! census (module globals, frame locals) by retained size, checked against
//! what the workload measures in itself (tracemalloc while each structure
//! was built, `len()`), through the agent's `/holders` and `pymem holders`
//! (with the agent and with the embedded observer).
use std::{net::TcpStream, path::Path, process::Command};

use serde_json::Value;

use crate::common::{
    Agent, OBSERVE_TIMEOUT, Workload, assert_within, free_port, get, get_ok, pyenv, stdout_of,
};
use pymem_agent::{
    census::CensusErrorBody,
    holders::{Holder, HoldersReport},
};

const HOLDERS_WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/holders.py");

/// The holders workload and its ground truth (its first line).
fn holders_workload(python: &Path) -> (Workload, Value) {
    let mut work = Workload::spawn_with(Command::new(python).arg("-u").arg(HOLDERS_WORKLOAD));
    let truth = work.command("truth");
    (work, truth)
}

/// An agent and the holders workload it observes.
fn observed_workload(python: &Path) -> (Agent, Workload, Value) {
    let agent = Agent::start(&[]);
    let (work, truth) = holders_workload(python);
    agent.wait_for(work.pid, OBSERVE_TIMEOUT);
    (agent, work, truth)
}

/// `pymem holders ARGS`: success, stdout, stderr.
fn pymem_holders(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_pymem"))
        .arg("holders")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn names(holders: &[Holder], n: usize) -> Vec<&str> {
    holders.iter().take(n).map(|h| h.name.as_str()).collect()
}

/// Levels of `holders` and their children (0: none).
fn depth_of(holders: &[Holder]) -> usize {
    holders
        .iter()
        .map(|h| 1 + depth_of(&h.children))
        .max()
        .unwrap_or(0)
}

/// `ORDERS` and `TOKENS` are the two heaviest holders, each retaining what
/// tracemalloc saw its build keep, with its exact length.
fn assert_top_two_are_the_globals(holders: &[Holder], truth: &Value) {
    let mut top = names(holders, 2);
    top.sort_unstable();
    assert_eq!(
        top,
        ["__main__.ORDERS", "__main__.TOKENS"],
        "the two heaviest holders: {:#?}",
        names(holders, 10)
    );
    for (name, key) in [("__main__.ORDERS", "orders"), ("__main__.TOKENS", "tokens")] {
        let holder = holders.iter().find(|h| h.name == name).unwrap();
        assert_eq!(holder.length, truth[key]["len"].as_u64(), "len({name})");
        assert_within(
            holder.retained_bytes as f64,
            truth[key]["traced_bytes"].as_f64().unwrap(),
            0.15,
            &format!("{name} retained bytes against tracemalloc"),
        );
        assert!(holder.deep_bytes >= holder.retained_bytes, "{holder:?}");
    }
}

// Needs the holders engine.
#[test]
fn holders_route_ranks_the_globals_and_finds_the_frame_local() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work, truth) = observed_workload(&python);
    let pid = work.pid;
    let report: HoldersReport =
        get_ok(&agent, &format!("/api/v1/processes/{pid}/holders?report=1"));
    assert_eq!(report.consistency, "paused");
    assert!(
        report.holders.warnings.is_empty(),
        "{:?}",
        report.holders.warnings
    );
    let holders = &report.holders.holders;
    assert_top_two_are_the_globals(holders, &truth);
    let batch = holders
        .iter()
        .find(|h| {
            h.name.contains("hold_batch") && h.name.replace("hold_batch", "").contains("batch")
        })
        .unwrap_or_else(|| {
            panic!(
                "no holder for hold_batch's batch (thread {}): {:#?}",
                truth["batch"]["ident"],
                names(holders, 30)
            )
        });
    assert_eq!(batch.length, truth["batch"]["len"].as_u64(), "{batch:?}");

    // The list form, cut: the same roots, first.
    let cut: Vec<Holder> = get_ok(
        &agent,
        &format!("/api/v1/processes/{pid}/holders?limit=2&depth=1&max_age=60"),
    );
    assert_eq!(names(&cut, 2), names(holders, 2));
    assert!(!cut[0].children.is_empty(), "{:?}", cut[0]);
}

#[test]
fn holders_route_cuts_roots_and_depth_and_reports_totals() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work, _) = observed_workload(&python);
    let pid = work.pid;
    let report: Value = get_ok(&agent, &format!("/api/v1/processes/{pid}/holders?report=1"));
    for field in [
        "pid",
        "taken_at",
        "consistency",
        "roots",
        "holders",
        "reachable_bytes",
        "unreachable_bytes",
        "opaque_types",
        "warnings",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
    assert_eq!(report["pid"], u64::from(pid));
    let roots = report["roots"].as_u64().unwrap() as usize;
    let all = report["holders"].as_array().unwrap();
    assert_eq!(all.len(), roots, "no limit: every root");
    for row in all {
        for field in [
            "name",
            "type",
            "length",
            "count",
            "retained_bytes",
            "deep_bytes",
            "children",
        ] {
            assert!(row.get(field).is_some(), "{field} missing: {row}");
        }
    }
    // A recent census is reused: the same one, cut.
    let cut: Vec<Holder> = get_ok(
        &agent,
        &format!("/api/v1/processes/{pid}/holders?limit=3&depth=0&max_age=600"),
    );
    assert!(cut.len() <= 3.min(roots), "{cut:?}");
    assert!(depth_of(&cut) <= 1, "depth 0: roots only");
    let again: HoldersReport = get_ok(
        &agent,
        &format!("/api/v1/processes/{pid}/holders?report=1&depth=1&max_age=600"),
    );
    assert_eq!(
        again.taken_at,
        report["taken_at"].as_f64().unwrap(),
        "reused"
    );
    assert!(depth_of(&again.holders.holders) <= 2, "depth 1");
}

#[test]
fn holders_route_answers_unknown_pids_in_json() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, _work, _) = observed_workload(&python);
    for query in ["", "?report=1", "?limit=5&depth=1"] {
        let (status, body) = get(&agent, &format!("/api/v1/processes/1/holders{query}"));
        assert_eq!(status, 404, "{body}");
        let error: CensusErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(error.error, "pid 1 is not observed");
        assert_eq!((error.pid, error.unsupported), (1, false));
    }
    let (status, body) = get(&agent, "/api/v1/processes/1/holders?depth=deep");
    assert_eq!(status, 400, "a bad query is the client's error: {body}");
}

#[test]
fn pymem_holders_names_what_is_wrong() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work, _) = observed_workload(&python);
    let port = agent.port.to_string();
    let (ok, _, err) = pymem_holders(&["1", "--agent", &port]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("Error: pid 1 is not observed by the agent at http://127.0.0.1:{port}")
    );
    let absent = free_port().to_string();
    let (ok, _, err) = pymem_holders(&["1", "--agent", &absent]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("Error: no pymem agent answered at http://127.0.0.1:{absent}")
    );
    let (ok, _, err) = pymem_holders(&["1", "--depth", "deep"]);
    assert!(!ok);
    assert!(
        err.contains("invalid value 'deep' for '--depth <N>'"),
        "{err}"
    );

    let pid = work.pid.to_string();
    let (ok, out, err) = pymem_holders(&[&pid, "--agent", &port, "--depth", "0"]);
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("pid {pid}: ")), "{out}");
    assert!(out.contains("\nreachable from the holders "), "{out}");
    let (ok, out, err) = pymem_holders(&[
        &pid, "--agent", &port, "--json", "--limit", "2", "--depth", "1",
    ]);
    assert!(ok, "{err}");
    let report: HoldersReport = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report.pid, work.pid);
    assert!(report.holders.holders.len() <= 2, "{report:?}");
    assert!(depth_of(&report.holders.holders) <= 2, "{report:?}");
}

// Needs the holders engine.
#[test]
fn pymem_holders_text_names_both_globals() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work, _) = observed_workload(&python);
    let port = agent.port.to_string();
    let (ok, out, err) = pymem_holders(&[&work.pid.to_string(), "--agent", &port]);
    assert!(ok, "{err}");
    eprintln!("{out}");
    let header = out.lines().nth(1).unwrap_or_default();
    assert!(header.starts_with("NAME "), "{out}");
    for name in ["__main__.ORDERS", "__main__.TOKENS"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} not a root line:\n{out}"
        );
    }
    assert!(
        out.contains("  [*]"),
        "children indented below the roots:\n{out}"
    );
}

// Needs the holders engine.
#[test]
fn pymem_holders_json_with_the_embedded_observer_ranks_the_globals() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    if TcpStream::connect("127.0.0.1:9477").is_ok() {
        eprintln!("SKIP: an agent runs on 127.0.0.1:9477; pymem holders would ask it");
        return;
    }
    let (work, truth) = holders_workload(&python);
    let (ok, out, err) = pymem_holders(&[&work.pid.to_string(), "--json"]);
    assert!(ok, "{err}");
    assert!(err.is_empty() || !err.contains("Error"), "{err}");
    let report: HoldersReport = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report.pid, work.pid);
    assert_top_two_are_the_globals(&report.holders.holders, &truth);
}

/// `pymem ARGS`, which must succeed: its stdout.
fn pymem(args: &[&str]) -> String {
    stdout_of(Command::new(env!("CARGO_BIN_EXE_pymem")).args(args))
}

/// Two snapshots around 50,000 more orders: each keeps at most 50 holders
/// two levels deep, and the diff puts ORDERS' growth first (the last part
/// needs the holders engine).
#[test]
fn snapshots_keep_the_holders_and_diff_shows_their_growth() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work, truth) = observed_workload(&python);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let pid = work.pid.to_string();
    let port = agent.port.to_string();
    pymem(&["snapshot", &pid, "-o", a, "--agent", &port]);
    let grown = work.command("grow 50000")["orders"]["len"]
        .as_u64()
        .unwrap();
    assert_eq!(grown, truth["orders"]["len"].as_u64().unwrap() + 50_000);
    pymem(&["snapshot", &pid, "-o", b, "--agent", &port]);
    for path in [a, b] {
        let snapshot: pymem_agent::cli::snapshot::SiteSnapshot =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let census = snapshot
            .census
            .unwrap_or_else(|| panic!("no census: {:?}", snapshot.census_error));
        let holders = &census.heap.holders.holders;
        assert!(holders.len() <= 50, "{} holders kept", holders.len());
        assert!(depth_of(holders) <= 3, "roots and two levels of children");
    }
    let diff: Value = serde_json::from_str(&pymem(&["diff", a, b, "--json"])).unwrap();
    let first = &diff["holders"][0];
    assert_eq!(first["name"], "__main__.ORDERS", "{:#}", diff["holders"]);
    assert_eq!(first["length_delta"], 50_000, "{first}");
    assert!(first["retained_delta"].as_i64().unwrap() > 0, "{first}");
    let text = pymem(&["diff", a, b]);
    assert!(
        text.contains("Holder growth between the censuses:\n"),
        "{text}"
    );
}
