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
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    Agent, OBSERVE_TIMEOUT, Workload,
    cgroup::{MemoryCgroup, NO_MEMORY_HIERARCHY},
    pyenv,
};

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
    let Some(limited) = MemoryCgroup::create("limited", Some(LIMIT_BYTES)) else {
        eprintln!("{NO_MEMORY_HIERARCHY}");
        return;
    };
    let unlimited = MemoryCgroup::create("unlimited", None).expect("the same hierarchy");
    eprintln!("memory controller: {:?}", limited.version);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[]);

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
