//! The object census against real Python processes: counts and sizes by
//! type checked against what the workload measures in itself, growth
//! between censuses, and the pause: a heap mutating at full speed, a
//! process another tracer holds, a tracer killed mid-pause.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    Agent, OBSERVE_TIMEOUT, Workload, assert_within,
    cgroup::{MemoryCgroup, NO_MEMORY_HIERARCHY},
    free_port, get, get_ok, pyenv, stdout_of,
};
use pymem_agent::census::{CensusErrorBody, CensusReport, TypeRow, pause::Pause};

const CENSUS_WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/census.py");

fn census_workload(python: &Path) -> Workload {
    Workload::spawn_with(Command::new(python).arg("-u").arg(CENSUS_WORKLOAD))
}

/// An agent and the census workload it observes.
fn observed_workload(python: &Path) -> (Agent, Workload) {
    let agent = Agent::start(&[]);
    let work = census_workload(python);
    agent.wait_for(work.pid, OBSERVE_TIMEOUT);
    (agent, work)
}

/// The row of the workload's class `class` (named `module.Class`).
fn row<'a>(rows: &'a [TypeRow], class: &str) -> &'a TypeRow {
    rows.iter()
        .find(|r| r.type_name.rsplit('.').next() == Some(class))
        .unwrap_or_else(|| {
            let top: Vec<_> = rows.iter().take(15).collect();
            panic!("{class} not among the types: {top:#?}")
        })
}

/// The scheduler states (`R`, `S`, `t`, …) of every thread of `pid`.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .chars()
                .next()
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tracer_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// The workload still answers (it runs, it is not held in a stop). A stop
/// that ends within seconds is another agent's pause: every test's agent
/// takes baseline censuses of the Python processes it finds, this one too.
fn assert_runs(work: &mut Workload) {
    let pid = work.pid;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states = thread_states(pid);
        if !states.contains(&'t') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads still stopped after 10 s: {states:?}, tracer {}",
            tracer_of(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ping = work.command("ping");
    assert!(ping.get("mutating").is_some(), "{ping}");
}

// Needs the heap engine (cpython/heap): the stub refuses every process.
#[test]
fn types_count_the_workload_class_and_its_dicts() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    let truth = work.command("make CensusItem 100000");
    let dicts = work.command("dicts 100000");
    let pid = work.pid;
    let rows: Vec<TypeRow> = get_ok(&agent, &format!("/api/v1/processes/{pid}/types"));
    let item = row(&rows, "CensusItem");
    assert_within(
        item.count as f64,
        truth["count"].as_f64().unwrap(),
        0.01,
        "CensusItem count",
    );
    assert_within(
        item.bytes as f64,
        truth["bytes"].as_f64().unwrap(),
        0.15,
        "CensusItem bytes",
    );
    let dict = rows.iter().find(|r| r.type_name == "dict").expect("dict");
    eprintln!(
        "dicts: census {}, gc.get_objects {}, held {}",
        dict.count, dicts["gc_dicts"], dicts["held"]
    );
    assert!(dict.count >= 100_000, "{dict:?}");
    assert!(
        rows.windows(2).all(|w| w[0].bytes >= w[1].bytes),
        "sorted by bytes"
    );
    let limited: Vec<TypeRow> = get_ok(
        &agent,
        &format!("/api/v1/processes/{pid}/types?limit=3&max_age=60"),
    );
    assert_eq!(limited.len(), 3);
    let report: CensusReport = get_ok(
        &agent,
        &format!("/api/v1/processes/{pid}/census?max_age=60"),
    );
    assert_eq!(report.census.consistency, "paused");
    assert!(report.census.copied_bytes > 0, "{:?}", report.census);
}

// Needs the heap engine.
#[test]
fn growth_puts_the_added_class_first() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    let pid = work.pid;
    let _: CensusReport = get_ok(&agent, &format!("/api/v1/processes/{pid}/census"));
    let before = work.command("make GrowthItem 0")["count"].as_f64().unwrap();
    let after = work.command("make GrowthItem 50000")["count"]
        .as_f64()
        .unwrap();
    let rows: Vec<TypeRow> = get_ok(&agent, &format!("/api/v1/processes/{pid}/types?growth=1"));
    let first = &rows[0];
    assert!(
        first.type_name.ends_with("GrowthItem"),
        "{:#?}",
        &rows[..rows.len().min(10)]
    );
    assert_within(
        first.count_delta.unwrap() as f64,
        after - before,
        0.01,
        "GrowthItem count delta",
    );
}

// Needs the heap engine.
#[test]
fn a_process_held_by_strace_is_censused_torn() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    let strace = Strace::attach(work.pid);
    let report: CensusReport = get_ok(&agent, &format!("/api/v1/processes/{}/census", work.pid));
    assert!(
        report.census.consistency.starts_with("may be torn: "),
        "{}",
        report.census.consistency
    );
    assert_eq!(report.census.pause_seconds, 0.0);
    drop(strace);
    assert_runs(&mut work);
}

/// `strace -p PID`, attached (its tracer pid is in the target's status)
/// until dropped.
struct Strace(Child);

impl Strace {
    fn attach(pid: u32) -> Strace {
        let child = Command::new("strace")
            .args(["-f", "-o", "/dev/null", "-p", &pid.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .expect("strace");
        let tracer = child.id();
        wait_until("strace attached", Duration::from_secs(10), || {
            tracer_of(pid) == tracer
        });
        Strace(child)
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        // SIGINT: strace detaches cleanly.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

#[test]
fn a_traced_process_cannot_be_paused_and_says_by_whom() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let mut work = census_workload(&python);
    let strace = Strace::attach(work.pid);
    let reason = Pause::stop(work.pid, Duration::from_secs(2))
        .err()
        .expect("a pause under strace");
    assert_eq!(
        reason,
        format!(
            "thread {} is already traced by pid {}",
            work.pid,
            strace.0.id()
        )
    );
    drop(strace);
    wait_until("strace gone", Duration::from_secs(5), || {
        tracer_of(work.pid) == 0
    });
    assert_runs(&mut work);
}

#[test]
fn a_pause_stops_every_thread_and_its_end_resumes_them() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let mut work = census_workload(&python);
    work.command("mutate 30");
    let pid = work.pid;
    let pause = Pause::stop(pid, Duration::from_secs(2)).expect("pause");
    let states = thread_states(pid);
    assert_eq!(pause.threads(), 2, "main and mutator: {states:?}");
    assert!(states.iter().all(|&s| s == 't'), "{states:?}");
    drop(pause);
    assert_runs(&mut work);
}

/// A tracer killed while it holds the process (as an agent killed
/// mid-census): the kernel detaches and the process runs on.
#[test]
fn a_tracer_killed_mid_pause_lets_the_process_run_on() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let mut work = census_workload(&python);
    work.command("mutate 30");
    let pid = work.pid;
    // SAFETY: the child only pauses the workload and sleeps until killed.
    let tracer = unsafe { libc::fork() };
    assert!(tracer >= 0, "fork");
    if tracer == 0 {
        let code = match Pause::stop(pid, Duration::from_secs(2)) {
            Ok(pause) => {
                std::mem::forget(pause);
                loop {
                    unsafe { libc::pause() };
                }
            }
            Err(_) => 3,
        };
        unsafe { libc::_exit(code) };
    }
    wait_until(
        "the workload held in a tracing stop",
        Duration::from_secs(10),
        || {
            let states = thread_states(pid);
            !states.is_empty() && states.iter().all(|&s| s == 't')
        },
    );
    unsafe { libc::kill(tracer, libc::SIGKILL) };
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(tracer, &mut status, 0) }, tracer);
    assert!(
        libc::WIFSIGNALED(status),
        "the tracer was killed, not exited: {status}"
    );
    wait_until("the workload resumed", Duration::from_secs(5), || {
        !thread_states(pid).contains(&'t')
    });
    assert_runs(&mut work);
    assert_eq!(tracer_of(pid), 0);
}

/// Ten censuses of a heap that allocates, frees and resizes at full speed:
/// each is a census or a clean error, and both processes live on.
#[test]
fn censuses_of_a_heap_mutating_at_full_speed_end_cleanly() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    work.command("mutate 60");
    let pid = work.pid;
    for round in 0..10 {
        let (status, body) = get(&agent, &format!("/api/v1/processes/{pid}/census"));
        match status {
            200 => {
                let report: CensusReport = serde_json::from_str(&body).unwrap();
                assert_eq!(report.census.pid, pid);
                assert_eq!(report.census.consistency, "paused", "round {round}");
            }
            500 | 501 => {
                let error: CensusErrorBody = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("round {round}: {e}: {body}"));
                assert_eq!(error.pid, pid);
                assert_eq!(error.unsupported, status == 501, "{body}");
            }
            other => panic!("round {round}: HTTP {other}: {body}"),
        }
        assert!(
            agent.get("/healthz").is_ok(),
            "agent alive after round {round}"
        );
        assert_runs(&mut work);
    }
    assert!(
        work.command("ping")["mutating"].as_bool().unwrap(),
        "the mutator still runs"
    );
}

/// Objects overwritten from inside (ctypes) read as garbage: the census and
/// the holders go on around them, and the agent and the target live.
#[test]
fn objects_scribbled_over_neither_crash_nor_hang_census_or_holders() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    let made = work.command("make CensusItem 20000");
    let scribbled = work.command("scribble 2000");
    assert_eq!(scribbled["scribbled"], 6000, "{scribbled}");
    let pid = work.pid;
    for round in 0..3 {
        let started = Instant::now();
        let (status, body) = get(&agent, &format!("/api/v1/processes/{pid}/holders?report=1"));
        assert_eq!(status, 200, "round {round}: {body}\n{}", agent.log());
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "round {round} took {:?}",
            started.elapsed()
        );
        // The untouched instances are still all counted.
        let (status, types) = get(
            &agent,
            &format!("/api/v1/processes/{pid}/types?max_age=600"),
        );
        assert_eq!(status, 200, "{types}");
        let rows: Vec<TypeRow> = serde_json::from_str(&types).unwrap();
        let items = row(&rows, "CensusItem");
        assert!(
            items.count >= made["count"].as_u64().unwrap(),
            "{items:?} vs {made}"
        );
        eprintln!(
            "round {round}: {} roots, warnings {}",
            report["roots"], report["warnings"]
        );
        assert!(
            agent.get("/healthz").is_ok(),
            "agent alive after round {round}"
        );
        assert_runs(&mut work);
    }
}

#[test]
fn census_routes_answer_unknown_pids_and_unsupported_builds_in_json() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work) = observed_workload(&python);
    for route in ["types", "census"] {
        let (status, body) = get(&agent, &format!("/api/v1/processes/1/{route}"));
        assert_eq!(status, 404, "{body}");
        let error: CensusErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(error.error, "pid 1 is not observed");
    }
    let (status, body) = get(&agent, &format!("/api/v1/processes/{}/types", work.pid));
    if status == 501 {
        let error: CensusErrorBody = serde_json::from_str(&body).unwrap();
        assert!(error.unsupported, "{body}");
        let prefix = format!("no object census of pid {}: ", work.pid);
        let reason = error.error.strip_prefix(&prefix).expect(&body).to_string();
        // The process remembers why, and is not paused again for it.
        wait_until(
            "census_unsupported in the process",
            Duration::from_secs(5),
            || {
                agent
                    .process(work.pid)
                    .and_then(|p| p.census_unsupported)
                    .as_deref()
                    == Some(&reason)
            },
        );
        let again = Instant::now();
        assert_eq!(
            get(&agent, &format!("/api/v1/processes/{}/census", work.pid)).0,
            501
        );
        eprintln!("second refusal took {:?}", again.elapsed());
    } else {
        assert_eq!(status, 200, "{body}");
        assert_eq!(agent.process(work.pid).unwrap().census_unsupported, None);
    }
}

#[test]
fn pymem_types_names_what_is_wrong() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, work) = observed_workload(&python);
    let types = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_pymem"))
            .arg("types")
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let port = agent.port.to_string();
    let (ok, _, err) = types(&["1", "--agent", &port]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("Error: pid 1 is not observed by the agent at http://127.0.0.1:{port}")
    );
    let absent = free_port().to_string();
    let (ok, _, err) = types(&["1", "--agent", &absent]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("Error: no pymem agent answered at http://127.0.0.1:{absent}")
    );
    let (ok, out, err) = types(&[&work.pid.to_string(), "--agent", &port]);
    if ok {
        assert!(out.starts_with(&format!("pid {}: ", work.pid)), "{out}");
        assert!(out.contains("CensusItem") || out.contains("dict"), "{out}");
    } else {
        assert!(
            err.starts_with(&format!("Error: no object census of pid {}: ", work.pid)),
            "{err}"
        );
    }
}

/// `pymem ARGS`, which must succeed: its stdout.
fn pymem(args: &[&str]) -> String {
    stdout_of(Command::new(env!("CARGO_BIN_EXE_pymem")).args(args))
}

// Needs the heap engine.
#[test]
fn snapshots_carry_the_census_and_diff_shows_type_growth() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (agent, mut work) = observed_workload(&python);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let pid = work.pid.to_string();
    let port = agent.port.to_string();
    pymem(&["snapshot", &pid, "-o", a, "--agent", &port]);
    let before = work.command("make GrowthItem 0")["count"].as_f64().unwrap();
    let after = work.command("make GrowthItem 50000")["count"]
        .as_f64()
        .unwrap();
    pymem(&["snapshot", &pid, "-o", b, "--agent", &port]);
    let snapshot: pymem_agent::cli::snapshot::SiteSnapshot =
        serde_json::from_str(&std::fs::read_to_string(b).unwrap()).unwrap();
    let census = snapshot
        .census
        .unwrap_or_else(|| panic!("no census: {:?}", snapshot.census_error));
    assert_eq!(census.consistency, "paused");
    let diff: pymem_agent::cli::diff::SnapshotDiff =
        serde_json::from_str(&pymem(&["diff", a, b, "--json"])).unwrap();
    let first = &diff.types[0];
    assert!(first.type_name.ends_with("GrowthItem"), "{:?}", &diff.types);
    assert_within(
        first.count_delta as f64,
        after - before,
        0.01,
        "GrowthItem growth in pymem diff",
    );
    let text = pymem(&["diff", a, b]);
    assert!(text.contains("Type growth between the censuses:"), "{text}");
}

/// An agent stopped (SIGTERM, as a pod's stop) while it parses a big
/// heap's census exits at once: the census is abandoned, not waited for,
/// and the process it paused runs on untraced.
#[test]
fn an_agent_stopped_mid_census_exits_at_once_and_the_process_runs_on() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let mut work = census_workload(&python);
    // ~7M objects: the debug build parses them for tens of seconds.
    work.command("bloat 300");
    work.command("dicts 1000000");
    let mut agent = Agent::start(&["--census-baseline", "false"]);
    agent.wait_for(work.pid, OBSERVE_TIMEOUT);
    let url = agent.url(&format!("/api/v1/processes/{}/census", work.pid));
    let census = std::thread::spawn(move || {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        http.get(&url).call().map(|r| r.status().as_u16())
    });
    let pid = work.pid;
    // The pause is over (copied), the parse under way.
    wait_until("the census's pause", Duration::from_secs(30), || {
        tracer_of(pid) != 0
    });
    wait_until("the pause's end", Duration::from_secs(30), || {
        tracer_of(pid) == 0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !census.is_finished(),
        "the census ended before the stop: too small a heap to test this"
    );
    let took = agent.stop();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM to exit: {took:?}:\n{}",
        agent.log()
    );
    eprintln!("stopped mid-census in {took:?}");
    // 503 (the observer stopped) or a closed connection; never a census.
    let answered = census.join().unwrap();
    assert!(!matches!(answered, Ok(200)), "{answered:?}");
    assert_runs(&mut work);
    assert_eq!(tracer_of(pid), 0);
}

/// An agent under a memory limit (a DaemonSet's) refuses a census whose
/// peak its free memory would not hold, saying which limit, instead of
/// being killed for memory; a heap that fits is censused as ever.
#[test]
fn a_census_too_big_for_the_agents_memory_limit_is_refused_not_oom_killed() {
    const AGENT_LIMIT: u64 = 640 << 20;
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let Some(cgroup) = MemoryCgroup::create("census-budget", Some(AGENT_LIMIT)) else {
        eprintln!("{NO_MEMORY_HIERARCHY}");
        return;
    };
    let mut big = census_workload(&python);
    // ~250 MiB of objects: its census would peak far above 640 MiB.
    let bloated = big.command("bloat 250");
    let mut small = census_workload(&python);
    let truth = small.command("make CensusItem 20000");
    let agent = Agent::start(&["--census-baseline", "false"]);
    cgroup.move_in(agent.child_pid());
    agent.wait_for(big.pid, OBSERVE_TIMEOUT);
    agent.wait_for(small.pid, OBSERVE_TIMEOUT);

    let (status, body) = get(&agent, &format!("/api/v1/processes/{}/census", big.pid));
    eprintln!("{bloated}: HTTP {status}: {body}");
    assert_eq!(status, 500, "{body}");
    let error: CensusErrorBody = serde_json::from_str(&body).unwrap();
    assert!(
        error.error.contains("free under its memory limit")
            && error.error.contains(&cgroup.limit_source())
            && error.error.ends_with("; not paused"),
        "{}",
        error.error
    );
    assert!(
        agent.get("/healthz").is_ok(),
        "agent alive:\n{}",
        agent.log()
    );
    assert_eq!(cgroup.oom_kills(), 0, "OOM kills in the agent's cgroup");
    assert_runs(&mut big);

    let rows: Vec<TypeRow> = get_ok(&agent, &format!("/api/v1/processes/{}/types", small.pid));
    assert_within(
        row(&rows, "CensusItem").count as f64,
        truth["count"].as_f64().unwrap(),
        0.01,
        "CensusItem count under the agent's memory limit",
    );
    assert_eq!(cgroup.oom_kills(), 0, "OOM kills in the agent's cgroup");
}

/// A heap over `--census-max-bytes` is refused before the pause, with the
/// sizes and the option named, and the process runs on.
#[test]
fn a_heap_over_census_max_bytes_is_refused_before_its_pause() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    // Any Python's private memory is well over 1 MiB.
    let agent = Agent::start(&[
        "--census-baseline",
        "false",
        "--census-max-bytes",
        "1048576",
    ]);
    let mut work = census_workload(&python);
    agent.wait_for(work.pid, OBSERVE_TIMEOUT);
    let (status, body) = get(&agent, &format!("/api/v1/processes/{}/census", work.pid));
    assert_eq!(status, 500, "{body}");
    let error: CensusErrorBody = serde_json::from_str(&body).unwrap();
    assert!(
        error
            .error
            .contains("above the limit of 1.0 MiB (--census-max-bytes 1.0 MiB); not paused"),
        "{}",
        error.error
    );
    assert!(!error.unsupported, "{body}");
    assert_runs(&mut work);
}
