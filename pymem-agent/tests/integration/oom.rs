//! OOM-kill post-mortems: a Python process leaking in a memory-limited
//! cgroup is killed by the kernel. Ground truth, measured apart from
//! pymem: the process died of SIGKILL, the cgroup's own OOM-kill count
//! went up, the limit is what the test wrote, the leaking line is read from
//! the script. The agent's post-mortem must name that limit, a heap that is
//! most of it, and that line.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    Agent, OBSERVE_TIMEOUT,
    cgroup::{MemoryCgroup, NO_MEMORY_HIERARCHY},
    describe_sites, pyenv, source_line,
};
use pymem_agent::model::OomKill;

/// The cgroup's memory limit.
const LIMIT_BYTES: u64 = 200 << 20;

/// Leaks 1 MiB of `bytes` (filled, so resident) 16 times a second from one
/// line, after a line on stdin.
const LEAK_SCRIPT: &str = "\
import sys, time
HELD = []
def leak():
    while True:
        HELD.append(b'x' * (1 << 20))  # LEAK
        time.sleep(1 / 16)
print('ready', flush=True)
sys.stdin.readline()
leak()
";

/// The leaking Python process, killed on drop if the kernel did not.
struct Victim {
    child: Child,
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pymem_oom_kills_total` in the agent's metrics.
fn oom_kills_total(agent: &Agent) -> u64 {
    let metrics = agent.metrics();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("pymem_oom_kills_total "))
        .unwrap_or_else(|| panic!("no pymem_oom_kills_total:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_python_process_killed_for_memory_leaves_a_post_mortem_with_its_limit_heap_and_leaking_line() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let Some(cgroup) = MemoryCgroup::create("oom", Some(LIMIT_BYTES)) else {
        eprintln!("{NO_MEMORY_HIERARCHY}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("oom_leak.py");
    fs::write(&script, LEAK_SCRIPT).unwrap();
    let leak_line = source_line(script.to_str().unwrap(), "the leak", |l| {
        l.contains("# LEAK")
    });

    let agent = Agent::start(&[]);
    let kills_before = oom_kills_total(&agent);
    let mut victim = Victim {
        child: Command::new(&python)
            .arg("-u")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let pid = victim.child.id();
    let mut ready = String::new();
    BufReader::new(victim.child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    cgroup.move_in(pid);
    let cgroup_kills_before = cgroup.oom_kills();
    agent.wait_for_probes(pid, OBSERVE_TIMEOUT);
    let leak_started = Instant::now();
    let mut stdin = victim.child.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();

    // ~13 s to fill 200 MiB at 16 MiB/s.
    let deadline = leak_started + Duration::from_secs(45);
    let status = loop {
        if let Some(status) = victim.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} still alive after 45 s of leaking into a {LIMIT_BYTES}-byte limit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let died_after = leak_started.elapsed();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "pid {pid} ended with {status}"
    );
    let cgroup_kills = cgroup.oom_kills();
    assert!(
        cgroup_kills > cgroup_kills_before,
        "the cgroup counts no OOM kill ({cgroup_kills_before} -> {cgroup_kills}): pid {pid} was killed otherwise"
    );

    // Recorded at the kill and published at once: no sample to wait for.
    let kill = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let kills: Vec<OomKill> = agent.get_json("/api/v1/oom-kills");
            if let Some(kill) = kills.into_iter().find(|k| k.pid == pid) {
                break kill;
            }
            assert!(
                Instant::now() < deadline,
                "no post-mortem of pid {pid}:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let sites = describe_sites(&kill.top_sites, 5);
    eprintln!(
        "pid {pid}: killed {:.1} s into the leak ({:?}); post-mortem {:.1} ms after the kill: heap {} bytes ({:.1}% of the {LIMIT_BYTES}-byte limit), anon RSS {:?}, limit {:?} from {:?}, {} unreadable stacks, top sites {sites:#?}",
        died_after.as_secs_f64(),
        kill.memory_limit.cgroup,
        kill.recorded_after_seconds * 1e3,
        kill.heap_bytes,
        kill.heap_bytes as f64 * 100.0 / LIMIT_BYTES as f64,
        kill.anon_rss_bytes,
        kill.memory_limit.limit_bytes,
        kill.memory_limit.limit_cgroup,
        kill.unreadable_stacks,
    );
    assert_eq!(
        kill.memory_limit.limit_bytes,
        Some(LIMIT_BYTES),
        "{kill:#?}"
    );
    assert_eq!(
        kill.memory_limit.cgroup.as_deref(),
        Some(cgroup.name().as_str())
    );
    assert!(
        kill.heap_bytes >= LIMIT_BYTES / 2,
        "a heap of {} bytes at the kill is not most of the {LIMIT_BYTES}-byte limit",
        kill.heap_bytes
    );
    let rank = kill
        .top_sites
        .iter()
        .position(|s| s.line == leak_line && Path::new(&s.file) == script);
    assert!(
        rank.is_some_and(|rank| rank < 3),
        "{}:{leak_line} not among the top 3 sites (rank {rank:?}): {sites:#?}",
        script.display()
    );
    assert_eq!(kill.python_version.get(..4), Some("3.11"));
    assert_eq!(
        kill.process.as_ref().map(|p| p.pid),
        Some(pid),
        "the last published process"
    );
    assert_eq!(oom_kills_total(&agent), kills_before + 1);
    agent.assert_logged(&format!("OOM kill: pid={pid} "));
    drop(victim);
    drop(cgroup);
}
