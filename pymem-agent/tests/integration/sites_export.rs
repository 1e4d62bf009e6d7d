//! The allocation-site tools against a real agent and a real leaking Python
//! process (tests/workloads/sites.py): `pymem sites`, `snapshot` and
//! `diff`, the pprof profile read back by Google's protobuf runtime, the
//! flame graph read by an XML parser, and the opt-in per-site metrics.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::common::{
    self, Agent, LEAKS, Leaker, pip_install_unless_importable, pyenv, site_line, stdout_of,
};
use pymem_agent::cli::{
    diff::{SiteDiff, SnapshotDiff},
    snapshot::SiteSnapshot,
};
use serde_json::{Value, json};

const WORKLOAD: &str = common::SITES_WORKLOAD;
/// Leaking rounds the agent sees before a test reads its sites.
const SETTLE: Duration = Duration::from_secs(3);
const PROFILE_PROTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pprof");

/// An agent with `extra` arguments and the default probe budget (sites.py
/// stays within it), and sites.py leaking under it for `SETTLE`, three
/// rounds a second: every `pymem sites` takes a census, and the heap stays
/// well inside the census's copy limit for the whole test.
fn start_leaking(python: &Path, extra: &[&str]) -> (Agent, Leaker) {
    let agent = Agent::start(extra);
    let leaker = Leaker::start_at(python, &agent, SETTLE, 3);
    (agent, leaker)
}

fn pymem_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pymem"));
    command.args(args).env("RUST_BACKTRACE", "0");
    command
}

fn pymem(args: &[&str]) -> Output {
    pymem_command(args).output().expect("running pymem")
}

/// Runs pymem, which must succeed; returns its stdout.
fn pymem_ok(args: &[&str]) -> String {
    stdout_of(&mut pymem_command(args))
}

/// Runs `pymem <command> <pid> --agent <agent's URL> <rest>`, which must
/// succeed; returns its stdout.
fn pymem_with_agent(agent: &Agent, command: &str, pid: u32, rest: &[&str]) -> String {
    let (pid, url) = (pid.to_string(), agent.url(""));
    let mut args = vec![command, &pid, "--agent", &url];
    args.extend_from_slice(rest);
    pymem_ok(&args)
}

fn find<'a>(sites: &'a [SiteDiff], function: &str) -> Option<&'a SiteDiff> {
    sites.iter().find(|s| s.function == function)
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `script` with `python`, passing `args`; its stdout is JSON.
fn python_json(python: &Path, script: &str, args: &[&str]) -> Value {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn diff_of_two_snapshots_shows_the_leaking_lines_growing() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, leaker) = start_leaking(&python, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));

    let table = pymem_with_agent(&agent, "sites", leaker.pid, &["--limit", "5"]);
    eprintln!("{table}");
    let small = format!("sites.py:{}", site_line("small"));
    assert!(
        table
            .lines()
            .any(|l| l.contains("leak_small_objects") && l.contains(&small)),
        "{table}"
    );

    // A snapshot reads the sites, then takes a census (which takes a while
    // for a heap this size): the diff spans from the first read to the
    // second, at least the sleep and at most the whole of both commands.
    let started = std::time::Instant::now();
    pymem_with_agent(&agent, "snapshot", leaker.pid, &["-o", path_str(&a)]);
    std::thread::sleep(Duration::from_secs(5));
    pymem_with_agent(&agent, "snapshot", leaker.pid, &["-o", path_str(&b)]);
    let both = started.elapsed().as_secs_f64();

    let text = pymem_ok(&["diff", path_str(&a), path_str(&b)]);
    eprintln!("{text}");
    let diff: SnapshotDiff = serde_json::from_str(&pymem_ok(&[
        "diff",
        path_str(&a),
        path_str(&b),
        "--json",
        "--limit",
        "0",
    ]))
    .unwrap();
    let sites = &diff.sites;
    for (function, marker) in LEAKS {
        let site = find(sites, function).unwrap_or_else(|| panic!("{function} missing: {diff:?}"));
        assert_eq!(site.line, site_line(marker), "{site:?}");
        assert!(site.file.ends_with("sites.py"));
        // Every round (three a second here) leaks ~2 MiB of small objects and
        // 160 KiB of blobs: over 5 s, 2.4 MiB of blobs at least.
        assert!(site.size_diff > 1 << 20, "{site:?}");
        let location = format!("sites.py:{}: size=", site_line(marker));
        let line = text.lines().find(|l| l.contains(&location)).unwrap();
        assert!(line.contains("(+") && line.ends_with(function), "{line}");
    }
    // The two leaks are the biggest changes; the churning line does not
    // grow. (Its absolute size may be a few stale samples: blocks sampled
    // while the per-process probes were being attached, before `free` was.)
    let top: Vec<&str> = sites[..2].iter().map(|s| s.function.as_str()).collect();
    assert!(
        top.contains(&"leak_small_objects") && top.contains(&"leak_large_blobs"),
        "{top:?}"
    );
    if let Some(churn) = sites.iter().find(|s| s.line == site_line("churn")) {
        assert!(churn.size_diff.abs() < 1 << 20, "{churn:?}");
    }
    assert!(diff.size_diff > 2 << 20, "{diff:?}");
    assert!(
        diff.seconds > 4.5 && diff.seconds < both + 1.0,
        "{both} s: {diff:?}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("Total: size=")),
        "{text}"
    );

    // Per-site series are opt-in.
    assert!(!agent.metrics().contains("pymem_site_live_bytes"));
}

#[test]
fn cli_errors_name_the_agent_and_the_pid() {
    let no_agent = format!("127.0.0.1:{}", common::free_port());
    let out = pymem(&["sites", "1", "--agent", &no_agent]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("no pymem agent answered at http://{no_agent}")),
        "{stderr}"
    );

    let agent = Agent::start(&[]);
    // Above any pid_max: never a process.
    let out = pymem(&[
        "snapshot",
        "4194305",
        "--agent",
        &agent.url(""),
        "-o",
        "/dev/null",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pid 4194305 is not observed by the agent"),
        "{stderr}"
    );
}

/// Decodes a gzip pprof file with Google's protobuf runtime and a module
/// protoc compiled from tests/fixtures/pprof/profile.proto; prints the
/// profile with string indices resolved.
const READ_PPROF: &str = r#"
import gzip, json, subprocess, sys, tempfile
proto_dir, path = sys.argv[1], sys.argv[2]
out = tempfile.mkdtemp()
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
                "--python_out=" + out, "profile.proto"], check=True)
sys.path.insert(0, out)
import profile_pb2
with open(path, "rb") as f:
    data = gzip.decompress(f.read())
p = profile_pb2.Profile()
p.ParseFromString(data)
s = p.string_table
functions = {f.id: f for f in p.function}
locations = {l.id: l for l in p.location}
def frame(location_id):
    (line,) = locations[location_id].line
    f = functions[line.function_id]
    return {"function": s[f.name], "file": s[f.filename], "line": line.line}
print(json.dumps({
    "first_string": s[0],
    "sample_type": [[s[t.type], s[t.unit]] for t in p.sample_type],
    "default_sample_type": s[p.default_sample_type],
    "comments": [s[c] for c in p.comment],
    "time_nanos": p.time_nanos,
    "samples": [{"value": list(x.value), "stack": [frame(i) for i in x.location_id]}
                for x in p.sample],
}))
"#;

/// The 3.11 interpreter with protobuf and grpcio-tools installed.
fn python_with_protobuf() -> Option<PathBuf> {
    let python = pyenv("3.11")?;
    pip_install_unless_importable(
        &python,
        "google.protobuf, grpc_tools",
        &["protobuf", "grpcio-tools"],
    );
    Some(python)
}

fn read_pprof(python: &Path, path: &Path) -> Value {
    python_json(python, READ_PPROF, &[PROFILE_PROTO, path_str(path)])
}

#[test]
fn pprof_profile_reads_back_as_the_snapshot_it_came_from() {
    let python = require!(python_with_protobuf(), "pyenv 3.11");
    let (agent, leaker) = start_leaking(&python, &[]);
    let dir = tempfile::tempdir().unwrap();
    let snapshot_path = dir.path().join("snapshot.json");
    let pprof_path = dir.path().join("sites.pb.gz");
    let pid = leaker.pid.to_string();
    pymem_with_agent(
        &agent,
        "snapshot",
        leaker.pid,
        &["-o", path_str(&snapshot_path)],
    );

    // Offline from the snapshot: the same moment on both sides.
    pymem_ok(&[
        "sites",
        path_str(&snapshot_path),
        "--pprof",
        path_str(&pprof_path),
    ]);
    let profile = read_pprof(&python, &pprof_path);
    let snapshot: SiteSnapshot =
        serde_json::from_str(&std::fs::read_to_string(&snapshot_path).unwrap()).unwrap();
    assert_eq!(profile["first_string"], "");
    assert_eq!(
        profile["sample_type"],
        json!([["inuse_space", "bytes"], ["alloc_space", "bytes"]])
    );
    assert_eq!(profile["default_sample_type"], "inuse_space");
    assert!(profile["comments"][0].as_str().unwrap().contains(&pid));
    let taken_at = snapshot.taken_at;
    assert!((profile["time_nanos"].as_f64().unwrap() / 1e9 - taken_at).abs() < 1e-3);

    // One sample per site: its values, its stack leaf first.
    let samples: HashMap<String, &Value> = profile["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stack"][0].to_string(), s))
        .collect();
    for site in snapshot.sites.iter().filter(|s| s.allocated_bytes > 0) {
        let leaf = json!({"function": site.function, "file": site.file, "line": site.line});
        let sample = samples
            .get(&leaf.to_string())
            .unwrap_or_else(|| panic!("no sample for {leaf}: {profile}"));
        assert_eq!(
            sample["value"],
            json!([site.bytes, site.allocated_bytes]),
            "{leaf}"
        );
        assert_eq!(sample["stack"], json!(site.stack), "{leaf}");
    }
    for (function, marker) in LEAKS {
        let sample = samples
            .values()
            .find(|s| s["stack"][0]["function"] == function)
            .unwrap_or_else(|| panic!("{function} not in the profile"));
        assert_eq!(
            sample["stack"][0]["line"].as_i64().unwrap(),
            site_line(marker)
        );
        assert!(sample["value"][0].as_i64().unwrap() > 1 << 20, "{sample}");
    }

    // Go's pprof reads it too, where Go is installed.
    let go_pprof = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-lines",
            "-sample_index=inuse_space",
        ])
        .arg(&pprof_path)
        .output();
    match go_pprof {
        Err(_) => eprintln!("SKIP: go tool pprof (no go here)"),
        Ok(out) => {
            let top = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{top}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            for (function, marker) in LEAKS {
                let row = format!("{function} {WORKLOAD}:{}", site_line(marker));
                assert!(top.contains(&row), "{row} not in:\n{top}");
            }
        }
    }

    // The agent's own endpoint serves the same format.
    let url = agent.url(&format!("/api/v1/processes/{pid}/pprof"));
    let mut response = ureq::get(&url).call().unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(content_type, "application/octet-stream");
    let body = response.body_mut().read_to_vec().unwrap();
    assert_eq!(&body[..2], b"\x1f\x8b", "gzip");
    let served = dir.path().join("served.pb.gz");
    std::fs::write(&served, body).unwrap();
    let profile = read_pprof(&python, &served);
    let leaves: Vec<&Value> = profile["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["stack"][0]["function"])
        .collect();
    assert!(leaves.contains(&&json!("leak_small_objects")), "{leaves:?}");
}

/// Parses an SVG with Python's XML parser and lists its <title> texts.
const SVG_TITLES: &str = r#"
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
print(json.dumps([t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]))
"#;

fn svg_titles(python: &Path, svg: &Path) -> Vec<String> {
    let titles = python_json(python, SVG_TITLES, &[path_str(svg)]);
    serde_json::from_value(titles).unwrap()
}

#[test]
fn flame_graph_is_well_formed_svg_naming_the_leaks() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, leaker) = start_leaking(&python, &[]);
    let dir = tempfile::tempdir().unwrap();
    let from_cli = dir.path().join("cli.svg");
    let pid = leaker.pid.to_string();
    pymem_with_agent(
        &agent,
        "sites",
        leaker.pid,
        &["--flamegraph", path_str(&from_cli)],
    );

    let mut response = ureq::get(&agent.url(&format!("/api/v1/processes/{pid}/flamegraph.svg")))
        .call()
        .unwrap();
    assert_eq!(response.headers()["content-type"], "image/svg+xml");
    let from_api = dir.path().join("api.svg");
    std::fs::write(&from_api, response.body_mut().read_to_vec().unwrap()).unwrap();

    for svg in [&from_cli, &from_api] {
        let titles = svg_titles(&python, svg);
        for (function, marker) in LEAKS {
            let frame = format!("{function} ({WORKLOAD}:{})", site_line(marker));
            assert!(
                titles.iter().any(|t| t.starts_with(&frame)),
                "{frame} not in {}: {titles:#?}",
                svg.display()
            );
        }
        assert!(
            titles.iter().any(|t| t.starts_with("main (")),
            "{titles:#?}"
        );
        if let Ok(status) = Command::new("xmllint").arg("--noout").arg(svg).status() {
            assert!(status.success(), "xmllint rejects {}", svg.display());
        }
    }
}

#[test]
fn site_metrics_expose_the_top_sites_when_asked() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    // Metrics come from allocation samples (no census): the full rate, so
    // that the blobs' samples pass 1 MiB.
    let agent = Agent::start(&["--site-metrics", "2"]);
    let leaker = Leaker::start(&python, &agent, SETTLE);
    let metrics = agent.metrics();
    let pid_label = format!("pid=\"{}\"", leaker.pid);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pymem_site_live_bytes{") && l.contains(&pid_label))
        .collect();
    eprintln!("{series:#?}");
    assert_eq!(series.len(), 2, "top 2 only: {series:#?}");
    for (function, marker) in LEAKS {
        let series = series
            .iter()
            .find(|l| l.contains(&format!("function=\"{function}\"")))
            .unwrap_or_else(|| panic!("no series for {function}"));
        assert!(
            series.contains(&format!("line=\"{}\"", site_line(marker))),
            "{series}"
        );
        assert!(series.contains(&format!("file=\"{WORKLOAD}\"")), "{series}");
        assert!(series.contains("python_version=\"3.11."), "{series}");
        let bytes: f64 = series.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(bytes > f64::from(1 << 20), "{series}");
    }
}
