//! A hostile Python process, which damages its own code objects, frames,
//! type objects and containers through ctypes while the agent samples it,
//! beside a well-behaved one with a known leak: the agent stays up,
//! answers for the hostile process within a bound and says its heap is
//! damaged, and still measures the well-behaved one exactly.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::{Agent, OBSERVE_TIMEOUT, get, pyenv};

const HOSTILE_WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/hostile.py");

/// How long any answer may take: a census pauses and copies the process,
/// on a loaded 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_secs(30);
/// How long the process list may take while the agent works on the
/// hostile process.
const LIST_BOUND: Duration = Duration::from_secs(10);

/// `hostile.py`, running until dropped.
struct Hostile {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Hostile {
    fn spawn(python: &Path) -> Hostile {
        let mut child = Command::new(python)
            .arg("-u")
            .arg(HOSTILE_WORKLOAD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut hostile = Hostile {
            pid: child.id(),
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        eprintln!("damaged: {:#?}", hostile.damaged());
        hostile
    }

    /// What it says it has damaged so far (its last line).
    fn damaged(&mut self) -> Vec<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let said: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("hostile.py said {line:?}: {e}"));
        said["damaged"]
            .as_array()
            .unwrap_or_else(|| panic!("hostile.py said {line:?}"))
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    }

    fn damage(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let damaged = self.damaged();
        eprintln!("after {command}: {}", damaged.last().unwrap());
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the hostile process died: the test damaged it beyond what it survives"
        );
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `/api/v1/processes` every 200 ms until dropped; the slowest
/// answer and every failure.
struct ListWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Duration, Vec<String>)>>,
}

impl ListWatch {
    fn start(agent: &Agent) -> ListWatch {
        let url = agent.url("/api/v1/processes");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let http: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(LIST_BOUND * 2))
                .build()
                .into();
            let mut slowest = Duration::ZERO;
            let mut failures = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answer = http
                    .get(&url)
                    .call()
                    .map_err(|e| e.to_string())
                    .and_then(|mut r| r.body_mut().read_to_string().map_err(|e| e.to_string()))
                    .and_then(|body| {
                        serde_json::from_str::<Vec<Value>>(&body).map_err(|e| e.to_string())
                    });
                slowest = slowest.max(started.elapsed());
                if let Err(e) = answer {
                    failures.push(e);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (slowest, failures)
        });
        ListWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// The slowest answer so far must be within `LIST_BOUND`, none failed.
    fn finish(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let (slowest, failures) = self.thread.take().unwrap().join().unwrap();
        assert!(failures.is_empty(), "the process list failed: {failures:?}");
        assert!(
            slowest <= LIST_BOUND,
            "the process list took {slowest:?} (bound {LIST_BOUND:?})"
        );
        slowest
    }
}

/// GET `path`, timed: the status, the body as JSON, the time taken.
fn timed_get(agent: &Agent, path: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let (status, body) = get(agent, path);
    let took = started.elapsed();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    eprintln!("GET {path}: {status} in {took:?}");
    assert!(
        took <= ANSWER_BOUND,
        "GET {path} took {took:?} (bound {ANSWER_BOUND:?}); the agent's censuses:\n{}",
        agent
            .log()
            .lines()
            .filter(|l| l.contains("census"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    (status, json, took)
}

/// The process's resident bytes, from procfs: no honest census of it can
/// find more.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Every function named in the stacks of `sites`.
fn stack_functions(sites: &Value) -> Vec<String> {
    let mut functions: Vec<String> = sites
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|site| site["stack"].as_array().unwrap())
        .map(|frame| frame["function"].as_str().unwrap().to_string())
        .collect();
    functions.sort();
    functions.dedup();
    functions
}

/// The census routes of the hostile process answer within the bound, flag
/// its heap as damaged and find no more memory than it has.
fn check_census_routes(agent: &Agent, pid: u32, damaged_threads: bool) {
    let rss = rss_bytes(pid);
    let (status, census, _) = timed_get(agent, &format!("/api/v1/processes/{pid}/census"));
    assert_eq!(status, 200, "{census}");
    let heap = &census["heap"];
    let warnings = heap["warnings"].to_string();
    eprintln!(
        "census: {} objects, {} bytes (RSS {rss}), {} damaged; warnings {warnings}; holders' warnings {}",
        heap["objects"], heap["object_bytes"], heap["damaged_objects"], heap["holders"]["warnings"]
    );
    // The list, the tuple and the dict it damaged.
    assert!(heap["damaged_objects"].as_u64().unwrap() >= 3, "{warnings}");
    assert!(
        warnings.contains("claim more memory than they have"),
        "{warnings}"
    );
    assert!(heap["object_bytes"].as_u64().unwrap() <= rss, "{heap}");
    if damaged_threads {
        let holder_warnings = heap["holders"]["warnings"].to_string();
        assert!(
            holder_warnings.contains("thread list does not end"),
            "{holder_warnings}"
        );
    }
    let (status, holders, _) = timed_get(agent, &format!("/api/v1/processes/{pid}/holders"));
    assert_eq!(status, 200, "{holders}");
    for holder in holders.as_array().unwrap() {
        assert!(
            holder["retained_bytes"].as_u64().unwrap() <= rss,
            "{holder}"
        );
        if holder["name"]
            .as_str()
            .unwrap()
            .starts_with("__main__.EVIL_")
        {
            assert!(holder["length"].is_null(), "{holder}");
        }
    }
    let (status, types, _) = timed_get(agent, &format!("/api/v1/processes/{pid}/types"));
    assert_eq!(status, 200, "{types}");
    let type_bytes: u64 = types
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        type_bytes <= rss,
        "types sum to {type_bytes} bytes, RSS {rss}"
    );
    let (status, report, _) = timed_get(agent, &format!("/api/v1/processes/{pid}/sites?report=1"));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["attribution"], "heap_state", "{report}");
    let note = report["note"].as_str().unwrap_or_default();
    assert!(note.contains("the heap is damaged"), "{report}");
    for site in report["sites"].as_array().unwrap() {
        assert!(site["bytes"].as_u64().unwrap() <= rss, "{site}");
    }
}

fn hostile_process_beside_a_well_behaved_one(python: &Path) {
    // Both processes start after the agent (no baseline census needed):
    // without baseline censuses of whatever else runs on the machine, the
    // hostile process's censuses wait for no other.
    let agent = Agent::start(&["--census-baseline", "false"]);
    let watch = ListWatch::start(&agent);
    let mut hostile = Hostile::spawn(python);
    let mut work = agent.workload_with_probes(python);
    agent.wait_for_probes(hostile.pid, OBSERVE_TIMEOUT);
    let pid = hostile.pid;
    // The hostile threads allocate all the time: the kernel captures their
    // damaged stacks and the agent symbolises them.
    let samples = format!("/api/v1/processes/{pid}/sites?attribution=allocation_samples");
    let deadline = Instant::now() + Duration::from_secs(20);
    let functions = loop {
        let (status, sites, _) = timed_get(&agent, &samples);
        assert_eq!(status, 200, "{sites}");
        let functions = stack_functions(&sites);
        let wanted = ["spin_inner", "victim_huge_linetable", "<unknown>"];
        if wanted.iter().all(|w| functions.iter().any(|f| f == w)) {
            break functions;
        }
        assert!(
            Instant::now() < deadline,
            "the hostile stacks never showed {wanted:?}: {functions:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Frames whose names cannot be read are `<unknown>`; a line table that
    // cannot be read costs only the line.
    eprintln!("functions in the hostile stacks: {functions:?}");
    check_census_routes(&agent, pid, false);
    hostile.damage("damage_thread_list");
    check_census_routes(&agent, pid, true);
    agent
        .measure(&mut work, "leak_bytes 6 300")
        .assert_heap_grew_by_the_leak("heap growth beside a hostile process");
    hostile.assert_alive();
    let slowest = watch.finish();
    eprintln!("slowest process list: {slowest:?}");
    assert_eq!(agent.get("/healthz").unwrap(), "ok\n");
}

test_each_interpreter!(hostile_process_beside_a_well_behaved_one {
    hostile_process_pyenv_3_11 => pyenv("3.11"), "pyenv 3.11";
    hostile_process_pyenv_3_12 => pyenv("3.12"), "pyenv 3.12";
    hostile_process_pyenv_3_13 => pyenv("3.13"), "pyenv 3.13";
});
