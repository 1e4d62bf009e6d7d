//! Allocation sites against real Python processes: the exact source lines
//! of known leaks, read from the workload's own source.
mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Agent, pyenv, site_line};
use serde_json::Value;

const WORKLOAD: &str = common::SITES_WORKLOAD;

fn find<'a>(sites: &'a [Value], function: &str) -> Option<(usize, &'a Value)> {
    sites
        .iter()
        .enumerate()
        .find(|(_, s)| s["function"] == function)
}

fn leaking_lines_are_top_sites(python: &Path) {
    let agent = Agent::start(&[]);
    let mut child = Command::new(python)
        .arg("-u")
        .arg(WORKLOAD)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    agent.wait_for_probes(pid, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(8));
    let sites: Vec<Value> = serde_json::from_str(
        &agent
            .get(&format!("/api/v1/processes/{pid}/sites"))
            .unwrap(),
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let top: Vec<String> = sites
        .iter()
        .take(5)
        .map(|s| {
            format!(
                "{}:{} {} live={}",
                s["file"], s["line"], s["function"], s["bytes"]
            )
        })
        .collect();
    eprintln!("top sites: {top:#?}");
    for (function, marker) in [
        ("leak_small_objects", "small"),
        ("leak_large_blobs", "large"),
    ] {
        let (rank, site) = find(&sites, function)
            .unwrap_or_else(|| panic!("{function} not among sites: {top:#?}"));
        assert!(rank < 3, "{function} ranked {rank}: {top:#?}");
        assert_eq!(site["line"].as_i64().unwrap(), site_line(marker), "{site}");
        assert!(
            site["file"].as_str().unwrap().ends_with("sites.py"),
            "{site}"
        );
        assert!(site["bytes"].as_u64().unwrap() > 1 << 20, "{site}");
        let stack = site["stack"].as_array().unwrap();
        assert_eq!(stack[0]["function"], function);
        assert!(stack.iter().any(|f| f["function"] == "main"), "{site}");
    }
    // Churn allocates and frees: it may appear, but holds almost nothing
    // (at most the arena pymalloc keeps around, and one being filled).
    if let Some((rank, site)) = find(&sites, "<listcomp>").or_else(|| find(&sites, "churn_only")) {
        assert!(rank >= 2, "churn ranked {rank}: {top:#?}");
        let live = site["bytes"].as_u64().unwrap();
        assert!(live <= 2 << 20, "churn holds {live} bytes: {site}");
    }
}

#[test]
fn leaking_lines_are_top_sites_pyenv_311() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    leaking_lines_are_top_sites(&python);
}

#[test]
fn leaking_lines_are_top_sites_debian_static_311() {
    let python = Path::new("/usr/bin/python3.11");
    require!(python.exists().then_some(()), "/usr/bin/python3.11");
    leaking_lines_are_top_sites(python);
}

#[test]
fn leaking_lines_are_top_sites_pyenv_313() {
    let python = require!(pyenv("3.13"), "pyenv 3.13");
    leaking_lines_are_top_sites(&python);
}

#[test]
fn leaking_lines_are_top_sites_pyenv_312() {
    let python = require!(pyenv("3.12"), "pyenv 3.12");
    leaking_lines_are_top_sites(&python);
}

#[test]
fn leaking_lines_are_top_sites_pyenv_310() {
    let python = require!(pyenv("3.10"), "pyenv 3.10");
    leaking_lines_are_top_sites(&python);
}

#[test]
fn leaking_lines_are_top_sites_pyenv_39() {
    let python = require!(pyenv("3.9"), "pyenv 3.9");
    leaking_lines_are_top_sites(&python);
}

#[test]
fn leaking_lines_are_top_sites_pyenv_38() {
    let python = require!(pyenv("3.8"), "pyenv 3.8");
    leaking_lines_are_top_sites(&python);
}
