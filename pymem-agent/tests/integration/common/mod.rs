//! Test harness: the real `pymem` binary, real Python processes, real HTTP.

pub mod cgroup;
pub mod checks;
pub mod interpreters;
pub mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use pymem_agent::{
    model::{Accounting, HeapBaseline, HeapBreakdown, ProcessInfo},
    sites::{Site, state::SitesReport},
};
use serde::de::DeserializeOwned;
use serde_json::Value;
pub use test_interpreters::{debian_python_3_11, pyenv};

pub const WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/memwork.py");
/// The allocation-site workload, with `# SITE: name` markers on its lines.
pub const SITES_WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/sites.py");

/// Discovery plus the harness's 2 s probe delay, on a loaded 2-core CI box.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The leaking functions of the sites workload, with their `# SITE:`
/// markers.
pub const LEAKS: [(&str, &str); 2] = [
    ("leak_small_objects", "small"),
    ("leak_large_blobs", "large"),
];

/// The 1-based number of the first line of `file` that satisfies `is_it`:
/// tests take expected source lines from the workloads themselves.
pub fn source_line(file: &str, what: &str, is_it: impl Fn(&str) -> bool) -> i64 {
    let source = std::fs::read_to_string(file).unwrap();
    let index = source
        .lines()
        .position(is_it)
        .unwrap_or_else(|| panic!("no {what} in {file}"));
    index as i64 + 1
}

/// The line number of the `# SITE: name` marker in the sites workload.
pub fn site_line(name: &str) -> i64 {
    let marker = format!("# SITE: {name}");
    source_line(SITES_WORKLOAD, &marker, |line| line.contains(&marker))
}

/// The sites workload, leaking until dropped.
pub struct Leaker {
    child: Child,
    pub pid: u32,
}

impl Leaker {
    /// Starts `SITES_WORKLOAD`, waits until the agent has its allocation
    /// probes, then lets it leak for `settle`.
    pub fn start(python: &Path, agent: &Agent, settle: Duration) -> Leaker {
        Self::start_at(python, agent, settle, 10)
    }

    /// As `start`, `rounds` rounds a second (each leaks ~2 MiB).
    pub fn start_at(python: &Path, agent: &Agent, settle: Duration, rounds: u32) -> Leaker {
        let mut child = Command::new(python)
            .arg("-u")
            .arg(SITES_WORKLOAD)
            .arg(rounds.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let pid = child.id();
        agent.wait_for_probes(pid, OBSERVE_TIMEOUT);
        std::thread::sleep(settle);
        Leaker { child, pid }
    }
}

impl Drop for Leaker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `pymem agent` on a free loopback port, stopped on drop.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    /// Starts the agent with a short window and fast sampling (tests wait
    /// less), plus `extra` arguments, and waits until it serves.
    pub fn start(extra: &[&str]) -> Agent {
        Self::start_until(extra, |agent| agent.get("/healthz").is_ok())
    }

    /// As `start`, waiting until `serves` says the agent serves (over
    /// TLS, say, which `get` does not speak).
    pub fn start_until(extra: &[&str], serves: impl Fn(&Agent) -> bool) -> Agent {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("agent.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["agent", "--listen", &listen];
        // Test defaults, each unless the test sets it.
        for (flag, value) in [
            ("--window", "10s"),
            ("--sample-interval", "250ms"),
            ("--probe-delay", "2s"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_pymem"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning pymem agent");
        let mut agent = Agent {
            child: Some(child),
            port,
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if serves(&agent) {
                return agent;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent did not start serving:\n{}", agent.log());
    }

    pub fn child_pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn get(&self, path: &str) -> Result<String, String> {
        ureq::get(&self.url(path))
            .call()
            .map_err(|e| e.to_string())?
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())
    }

    /// GETs `path` and reads its JSON as a `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> T {
        let body = self.get(path).unwrap_or_else(|e| {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "GET {path}: {e}; the agent's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}:\n{body}"))
    }

    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.get_json("/api/v1/processes")
    }

    pub fn process(&self, pid: u32) -> Option<ProcessInfo> {
        self.processes().into_iter().find(|p| p.pid == pid)
    }

    /// The process as the API's JSON, for the checks of its shape (which
    /// fields are there at all); `process` for its values.
    pub fn process_json(&self, pid: u32) -> Option<Value> {
        self.get_json::<Vec<Value>>("/api/v1/processes")
            .into_iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
    }

    /// The sites of `pid` by allocation samples (the kernel's stacks),
    /// heaviest first.
    pub fn sites(&self, pid: u32) -> Vec<Site> {
        self.get_json(&format!(
            "/api/v1/processes/{pid}/sites?attribution=allocation_samples"
        ))
    }

    /// The sites of `pid` as the agent attributes them by default (heap
    /// state where a census works), with how they were attributed.
    pub fn sites_report(&self, pid: u32) -> SitesReport {
        self.get_json(&format!("/api/v1/processes/{pid}/sites?report=1"))
    }

    /// Waits until `pid` is observed.
    pub fn wait_for(&self, pid: u32, timeout: Duration) -> ProcessInfo {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.process(pid) {
                return p;
            }
            if Instant::now() > deadline {
                panic!("pid {pid} not observed within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `pid` has its per-allocation probes (start-up over).
    pub fn wait_for_probes(&self, pid: u32, timeout: Duration) -> ProcessInfo {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.wait_for(pid, timeout);
            if p.accounting == Accounting::Probes {
                return p;
            }
            if Instant::now() > deadline {
                panic!("pid {pid} never got its probes: {p:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a process older than its observation (found by a scan,
    /// or forked) has had its baseline census: from then on its heap moves
    /// only with what it allocates and frees.
    pub fn wait_for_baseline(&self, pid: u32, timeout: Duration) -> ProcessInfo {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.wait_for(pid, timeout);
            if p.heap_baseline == HeapBaseline::Census {
                return p;
            }
            assert_eq!(
                p.heap_baseline,
                HeapBaseline::SinceAttach,
                "pid {pid} was not found running or forked:\n{}",
                self.log()
            );
            if Instant::now() > deadline {
                panic!(
                    "pid {pid}: no baseline census within {timeout:?}: {p:?}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts memwork.py with `python` and waits until the agent has its
    /// probes.
    pub fn workload_with_probes(&self, python: &Path) -> Workload {
        let work = Workload::spawn(python);
        self.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
        work
    }

    /// The process after the agent has sampled a quiet period, so its
    /// numbers reflect everything the workload did before.
    pub fn settled(&self, pid: u32) -> ProcessInfo {
        std::thread::sleep(Duration::from_millis(1200));
        self.process(pid)
            .unwrap_or_else(|| panic!("pid {pid} not observed:\n{}", self.log()))
    }

    /// Runs one workload command between two settled readings of the
    /// process, so the difference is what that command did.
    pub fn measure(&self, work: &mut Workload, command: &str) -> Measured {
        let before = self.settled(work.pid);
        let result = work.command(command);
        let after = self.settled(work.pid);
        Measured {
            before,
            result,
            after,
        }
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's log has `text`.
    pub fn assert_logged(&self, text: &str) {
        let log = self.log();
        assert!(log.contains(text), "{log}");
    }

    /// SIGKILL and wait: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns how long the agent took to exit.
    pub fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let start = Instant::now();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = start + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "agent exited with {status}:\n{}",
                    self.log()
                );
                return start.elapsed();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent ignored SIGTERM for 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// The agent's view of a process around one workload command.
pub struct Measured {
    pub before: ProcessInfo,
    /// What the workload answered (its own ground truth).
    pub result: Value,
    pub after: ProcessInfo,
}

impl Measured {
    pub fn heap_growth(&self) -> f64 {
        heap(&self.after) - heap(&self.before)
    }

    /// The bytes the workload's command says it leaked.
    pub fn leaked_bytes(&self) -> f64 {
        self.result["bytes"].as_f64().unwrap()
    }

    /// The heap grew by what the command leaked, within 10 %.
    pub fn assert_heap_grew_by_the_leak(&self, what: &str) {
        assert_within(self.heap_growth(), self.leaked_bytes(), 0.10, what);
    }

    /// Growth of one `heap` source, e.g. `|heap| heap.arena_bytes`.
    pub fn source_growth(&self, source: impl Fn(&HeapBreakdown) -> u64) -> f64 {
        source(&self.after.heap) as f64 - source(&self.before.heap) as f64
    }
}

/// A Python process running `memwork.py`, driven line by line.
pub struct Workload {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
    /// The pid Python sees (its own PID namespace's), from its hello line.
    pub ns_pid: u32,
    pub version: String,
}

impl Workload {
    pub fn spawn(python: &Path) -> Workload {
        Self::spawn_with(Command::new(python).arg("-u").arg(WORKLOAD))
    }

    /// Spawns a prepared command (chroot, unshare, …) that runs memwork.py.
    pub fn spawn_with(command: &mut Command) -> Workload {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning Python");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut workload = Workload {
            pid: child.id(),
            child,
            stdin,
            stdout,
            ns_pid: 0,
            version: String::new(),
        };
        let hello = workload.read();
        workload.version = hello["version"].as_str().unwrap().to_string();
        workload.ns_pid = hello["pid"].as_u64().unwrap_or(0) as u32;
        // Behind chroot/unshare wrappers the Python pid is the wrapper's
        // child: trust the host pid only when it's the same process.
        if let Some(inner) = hello["pid"].as_u64()
            && inner as u32 != workload.pid
        {
            workload.pid = find_host_pid(workload.child.id(), inner as u32);
        }
        workload
    }

    /// The pid of the process the harness started (a wrapper, or the
    /// parent of a fork, when `pid` is elsewhere).
    pub fn launcher_pid(&self) -> u32 {
        self.child.id()
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad workload line {line:?}: {e}"))
    }

    pub fn command(&mut self, cmd: &str) -> Value {
        self.send(cmd);
        self.read()
    }

    /// Sends a command without waiting for its answer (a long-running
    /// background load).
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// pymalloc arena bytes currently mapped, as the interpreter reports.
    pub fn arena_bytes(&mut self) -> u64 {
        let stats = self.command("stats");
        stats["arenas"].as_u64().unwrap() * stats["arena_size"].as_u64().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host pid of a descendant of `ancestor` whose innermost namespace pid
/// is `ns_pid`.
fn find_host_pid(ancestor: u32, ns_pid: u32) -> u32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let nspid = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u32>().ok());
        let ppid_chain_has_ancestor = {
            let mut cur = pid;
            let mut found = false;
            for _ in 0..8 {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{cur}/stat")) else {
                    break;
                };
                let after = stat.rsplit(')').next().unwrap_or("");
                let ppid: u32 = after
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if ppid == ancestor {
                    found = true;
                    break;
                }
                if ppid <= 1 {
                    break;
                }
                cur = ppid;
            }
            found
        };
        if nspid == Some(ns_pid) && ppid_chain_has_ancestor {
            return pid;
        }
    }
    panic!("no descendant of {ancestor} with namespace pid {ns_pid}");
}

/// GET `path` from `agent`: the status and the body, errors included (a
/// census may take a while).
pub fn get(agent: &Agent, path: &str) -> (u16, String) {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut response = http
        .get(&agent.url(path))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", agent.log()));
    let body = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), body)
}

/// GET `path`, which must answer 200 with JSON of type `T`.
pub fn get_ok<T: DeserializeOwned>(agent: &Agent, path: &str) -> T {
    let (status, body) = get(agent, path);
    assert_eq!(status, 200, "GET {path}: {body}\n{}", agent.log());
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Runs `command`, which must succeed; returns its stdout.
pub fn stdout_of(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Installs `packages` with `python`'s pip unless `modules` (`a, b`) import;
/// whether they import now.
pub fn pip_install_unless_importable(python: &Path, modules: &str, packages: &[&str]) -> bool {
    let importable = || {
        Command::new(python)
            .args(["-c", &format!("import {modules}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        stdout_of(
            Command::new(python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(packages)
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        );
    }
    importable()
}

/// Skips (with a visible message) when an interpreter is truly absent.
macro_rules! require {
    ($opt:expr, $what:expr) => {
        match $opt {
            Some(v) => v,
            None => {
                eprintln!("SKIP: {} is not installed here", $what);
                return;
            }
        }
    };
}

/// One `#[test]` per interpreter, `name => interpreter, what;`: each runs
/// `check(&python)`, or skips like `require!` where the interpreter is
/// `None`.
macro_rules! test_each_interpreter {
    ($check:ident { $($name:ident => $python:expr, $what:expr;)+ }) => {
        $(
            #[test]
            fn $name() {
                let python = require!($python, $what);
                $check(&python);
            }
        )+
    };
}

/// The first `n` of `sites`, one line each (`file:line function bytes
/// holder store`), for failure messages and logs.
pub fn describe_sites(sites: &[Site], n: usize) -> Vec<String> {
    sites
        .iter()
        .take(n)
        .map(|s| {
            format!(
                "{}:{} {} {} {:?} {:?}",
                s.file, s.line, s.function, s.bytes, s.holder, s.store
            )
        })
        .collect()
}

/// |a - b| <= tolerance * b
pub fn assert_within(measured: f64, truth: f64, tolerance: f64, what: &str) {
    let error = (measured - truth).abs() / truth.abs().max(1.0);
    assert!(
        error <= tolerance,
        "{what}: measured {measured:.0}, ground truth {truth:.0}, error {:.1}% > {:.0}%",
        error * 100.0,
        tolerance * 100.0
    );
    eprintln!(
        "{what}: measured {measured:.0}, ground truth {truth:.0}, error {:.2}%",
        error * 100.0
    );
}

pub fn heap(p: &ProcessInfo) -> f64 {
    p.heap_bytes as f64
}
