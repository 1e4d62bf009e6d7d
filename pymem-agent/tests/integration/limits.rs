//! Memory limits and the time to reach them, as root: a Python process
//! leaking steadily in a cgroup whose memory limit the test sets, until
//! the kernel OOM-kills it. The agent's time to the limit is checked
//! against when the kill actually happened, its limit against the value
//! the test wrote, and a process outside any limited cgroup against
//! `/proc/meminfo`.
//!
//! cgroup v2 when the machine's cgroup2 hierarchy has the memory
//! controller, else cgroup v1's memory hierarchy (hybrid hosts); skipped
//! only when neither exists.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{Agent, OBSERVE_TIMEOUT, Workload, pyenv};

const LIMIT_BYTES: u64 = 300 << 20;
const LEAK_MIB_PER_SECOND: u32 = 10;
/// How far the agent's time to the limit may be from the measured one.
const TOLERANCE: f64 = 0.20;

/// Waits for a line on stdin (so that it is in its cgroup before it
/// allocates), then leaks `argv[1]` MiB/s of small objects (pymalloc),
/// paced in 20 ms slices, until it is killed.
const LEAKER: &str = r#"
import gc, sys, time
# Full collections over an ever longer chain would stall the leak.
gc.disable()
rate = int(sys.argv[1]) << 20
LINK = 540  # bytes of one link: a 2-item list (64 + 16) and a 400-char str (464)
print("ready", flush=True)
sys.stdin.readline()
chain = None
done = 0
start = time.time()
while True:
    due = int((time.time() - start) * rate / LINK)
    while done < due:
        chain = [chain, "x" * 400 + str(done)]
        done += 1
    time.sleep(0.02)
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V2,
    V1,
}

/// A cgroup hierarchy with the memory controller: its mount point.
#[derive(Clone, Debug)]
struct Hierarchy {
    version: Version,
    root: PathBuf,
}

/// cgroup v2 if its root offers the memory controller, else the cgroup v1
/// memory hierarchy, from this process's mounts.
fn memory_hierarchy() -> Option<Hierarchy> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts: Vec<(String, String, String)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?.to_owned();
            let mut after = after.split_whitespace();
            let fs_type = after.next()?.to_owned();
            let options = after.nth(1).unwrap_or("").to_owned();
            Some((mount_point, fs_type, options))
        })
        .collect();
    let v2 = mounts.iter().find_map(|(at, fs_type, _)| {
        let controllers = fs::read_to_string(Path::new(at).join("cgroup.controllers")).ok()?;
        (fs_type == "cgroup2" && controllers.split_whitespace().any(|c| c == "memory")).then(|| {
            Hierarchy {
                version: Version::V2,
                root: PathBuf::from(at),
            }
        })
    });
    let v1 = || {
        mounts.iter().find_map(|(at, fs_type, options)| {
            (fs_type == "cgroup" && options.split(',').any(|o| o == "memory")).then(|| Hierarchy {
                version: Version::V1,
                root: PathBuf::from(at),
            })
        })
    };
    v2.or_else(v1)
}

/// A cgroup of this test's, directly under the hierarchy's root (whose
/// own limit is none by design), removed on drop with whatever still runs
/// in it (only this test's processes).
struct TestCgroup {
    version: Version,
    dir: PathBuf,
}

impl TestCgroup {
    /// A new cgroup limited to `limit` bytes (swap off), or unlimited.
    fn create(hierarchy: &Hierarchy, name: &str, limit: Option<u64>) -> TestCgroup {
        let unique = format!(
            "pymem-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        if hierarchy.version == Version::V2 {
            let control = hierarchy.root.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                fs::write(&control, "+memory").unwrap();
            }
        }
        let dir = hierarchy.root.join(unique);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cgroup = TestCgroup {
            version: hierarchy.version,
            dir,
        };
        if let Some(limit) = limit {
            let limit = limit.to_string();
            match cgroup.version {
                Version::V2 => {
                    cgroup.write("memory.max", &limit);
                    if cgroup.dir.join("memory.swap.max").exists() {
                        cgroup.write("memory.swap.max", "0");
                    }
                }
                Version::V1 => {
                    cgroup.write("memory.limit_in_bytes", &limit);
                    // Memory + swap no higher than memory: no swap.
                    if cgroup.dir.join("memory.memsw.limit_in_bytes").exists() {
                        cgroup.write("memory.memsw.limit_in_bytes", &limit);
                    }
                }
            }
        }
        cgroup
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value).unwrap_or_else(|e| panic!("{} = {value}: {e}", path.display()));
    }

    fn move_in(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p.trim() == pid.to_string()),
            "pid {pid} not in {}: {procs}",
            self.dir.display()
        );
    }

    /// OOM kills in this cgroup so far, as the kernel counts them.
    fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The source the agent should name for this cgroup's limit.
    fn limit_source(&self) -> String {
        match self.version {
            Version::V2 => format!("cgroup v2 memory.max {}", self.dir.display()),
            Version::V1 => format!("cgroup v1 memory.limit_in_bytes {}", self.dir.display()),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let procs = self.dir.join("cgroup.procs");
        for _ in 0..50 {
            let pids = fs::read_to_string(&procs).unwrap_or_default();
            if pids.trim().is_empty() {
                break;
            }
            for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// The leaking script, killed on drop.
struct Leaker {
    child: Child,
    stdin: ChildStdin,
    pid: u32,
}

impl Leaker {
    /// Started and waiting for `go`.
    fn spawn(python: &Path, dir: &Path) -> Leaker {
        let script = dir.join("leaker.py");
        fs::write(&script, LEAKER).unwrap();
        let mut child = Command::new(python)
            .arg("-u")
            .arg(&script)
            .arg(LEAK_MIB_PER_SECOND.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning Python");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        Leaker {
            pid: child.id(),
            stdin: child.stdin.take().unwrap(),
            child,
        }
    }

    fn go(&mut self) {
        writeln!(self.stdin, "go").unwrap();
        self.stdin.flush().unwrap();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Leaker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `MemTotal` from /proc/meminfo, in bytes, and `MemTotal - MemAvailable`.
fn meminfo() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let total = field("MemTotal");
    (total, total - field("MemAvailable"))
}

#[test]
fn time_to_limit_predicts_the_oom_kill_and_limits_are_the_ones_set() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let Some(hierarchy) = memory_hierarchy() else {
        eprintln!(
            "SKIP: no cgroup hierarchy with the memory controller (neither cgroup2's cgroup.controllers nor a cgroup v1 mount lists memory)"
        );
        return;
    };
    eprintln!("memory controller: {hierarchy:?}");
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[]);
    let limited = TestCgroup::create(&hierarchy, "limited", Some(LIMIT_BYTES));
    let unlimited = TestCgroup::create(&hierarchy, "unlimited", None);

    let idler = Workload::spawn(&python);
    unlimited.move_in(idler.pid);
    let mut leaker = Leaker::spawn(&python, dir.path());
    limited.move_in(leaker.pid);
    agent.wait_for(leaker.pid, OBSERVE_TIMEOUT);
    let oom_kills_before = limited.oom_kills();
    let started = Instant::now();
    leaker.go();

    // The agent reports a time to the limit once it suspects the leak.
    let (t0, reported) = loop {
        let asked = Instant::now();
        let p = agent.process(leaker.pid);
        if let Some(p) = p.filter(|p| p.time_to_limit_seconds.is_some()) {
            break (asked, p);
        }
        if let Some(status) = leaker.exited() {
            panic!(
                "the leaker exited ({status}) after {:.1} s before the agent gave a time to its limit:\n{}",
                started.elapsed().as_secs_f64(),
                agent.log()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no time_to_limit_seconds 30 s into the leak: {:?}\n{}",
            agent.process(leaker.pid),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let eta = reported.time_to_limit_seconds.unwrap();
    eprintln!(
        "{:.1} s into the leak: time to limit {eta:.1} s (usage {:?} of {:?}, growth {:.0} B/s, {:?})",
        started.elapsed().as_secs_f64(),
        reported.memory_usage_bytes,
        reported.memory_limit_bytes,
        reported.growth_bytes_per_second,
        reported.memory_limit_source
    );
    assert_eq!(
        reported.memory_limit_bytes,
        Some(LIMIT_BYTES),
        "{reported:?}"
    );
    assert_eq!(
        reported.memory_limit_source.as_deref(),
        Some(limited.limit_source().as_str())
    );

    // Outside any limited cgroup: the host's memory.
    let host = agent.process(idler.pid).expect("idler observed");
    let (total, used) = meminfo();
    assert_eq!(
        host.memory_limit_source.as_deref(),
        Some("host"),
        "{host:?}"
    );
    assert_eq!(host.memory_limit_bytes, Some(total), "MemTotal");
    let host_usage = host.memory_usage_bytes.expect("host usage") as f64;
    assert!(
        (host_usage - used as f64).abs() <= 0.05 * total as f64,
        "host usage {host_usage} vs MemTotal - MemAvailable {used}"
    );
    assert_eq!(host.time_to_limit_seconds, None, "not leaking: {host:?}");

    // The kernel kills the leaker when its cgroup reaches the limit.
    let deadline = t0 + Duration::from_secs_f64(eta * 2.0 + 20.0);
    let (t1, status) = loop {
        if let Some(status) = leaker.exited() {
            break (Instant::now(), status);
        }
        assert!(
            Instant::now() < deadline,
            "the leaker still runs {:.1} s after a time to limit of {eta:.1} s",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let oom_kills = limited.oom_kills() - oom_kills_before;
    assert!(
        oom_kills >= 1,
        "the leaker exited ({status}) without an OOM kill in its cgroup"
    );
    let actual = (t1 - t0).as_secs_f64();
    let error = (eta - actual).abs() / actual;
    eprintln!(
        "time to limit: predicted {eta:.1} s, OOM kill after {actual:.1} s, error {:.1}% ({status}, {oom_kills} OOM kill)",
        error * 100.0
    );
    assert!(
        error <= TOLERANCE,
        "predicted {eta:.1} s to the limit, reached after {actual:.1} s: error {:.1}% > {:.0}%",
        error * 100.0,
        TOLERANCE * 100.0
    );
}
