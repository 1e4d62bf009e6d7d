//! Bad input: the agent neither crashes nor stalls, says what happened,
//! and still reports correct numbers afterwards.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{self, Agent, OBSERVE_TIMEOUT, Workload, debian_python_3_11, pyenv};

/// After whatever the test did, a fresh leak is still measured right.
fn still_measures_correctly(agent: &Agent, python: &Path) {
    let mut work = agent.workload_with_probes(python);
    agent
        .measure(&mut work, "leak_bytes 6 300")
        .assert_heap_grew_by_the_leak("heap growth after bad input");
}

#[test]
fn non_python_and_fake_python_processes_are_skipped_with_a_reason() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let dir = tempfile::tempdir().unwrap();
    // A shell script called python3, and a copy of a non-Python ELF called
    // python3.11: both look like Python by name.
    let script = dir.path().join("python3");
    std::fs::write(&script, "#!/bin/sh\nsleep 60\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake_elf = dir.path().join("python3.11");
    std::fs::copy("/bin/sleep", &fake_elf).unwrap();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let mut fake = Command::new(&fake_elf).arg("60").spawn().unwrap();
    let agent = Agent::start(&[]);
    // Started after the agent: found through its exec event.
    let mut shell = Command::new(&script).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for pid in [sleeper.id(), fake.id(), shell.id()] {
        assert!(
            agent.process(pid).is_none(),
            "pid {pid} must not be observed"
        );
    }
    let log = agent.log();
    for pid in [fake.id(), shell.id()] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("pid {pid}: not observed")))
            .unwrap_or_else(|| panic!("no reason logged for fake Python pid {pid}:\n{log}"));
        assert!(line.contains("not a CPython interpreter"), "{line}");
    }
    assert!(
        !log.contains(&format!("pid {}:", sleeper.id())),
        "plain non-Python processes are only logged at debug level:\n{log}"
    );
    still_measures_correctly(&agent, &python);
    for child in [&mut sleeper, &mut fake, &mut shell] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A Python process that maps a truncated file named like libpython: the
/// hostile file is rejected, the real interpreter (the executable) is used.
#[test]
fn truncated_libpython_mapping_does_not_hide_the_real_interpreter() {
    let python = require!(debian_python_3_11(), "/usr/bin/python3.11");
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libpython3.11.so.1.0");
    let real = std::fs::read(&python).unwrap();
    std::fs::write(&bogus, &real[..64 * 1024]).unwrap();
    let agent = Agent::start(&[]);
    let script = format!(
        "import mmap, sys, time\nf = open({:?}, 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
         exec(open({:?}).read())\n",
        bogus.display().to_string(),
        common::WORKLOAD
    );
    let mut work = Workload::spawn_with(Command::new(&python).arg("-u").arg("-c").arg(script));
    let p = agent.wait_for_probes(work.pid, OBSERVE_TIMEOUT);
    assert_eq!(p.binary, "/usr/bin/python3.11", "{p:?}");
    agent
        .measure(&mut work, "leak_bytes 5 300")
        .assert_heap_grew_by_the_leak("heap growth next to a truncated libpython");
}

/// Hundreds of Python processes that exit while the agent inspects and
/// attaches to them.
#[test]
fn processes_exiting_during_attach_do_not_hurt() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&["--probe-delay", "0s"]);
    let started = Instant::now();
    let mut spawned = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let mut children: Vec<_> = (0..10)
            .map(|_| {
                Command::new(&python)
                    .args(["-c", "pass"])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in &mut children {
            child.wait().unwrap();
        }
        spawned += children.len();
    }
    eprintln!("{spawned} short-lived Python processes started and exited");
    assert!(spawned >= 20, "only {spawned} processes in 8 s");
    assert_eq!(agent.get("/healthz").unwrap(), "ok\n");
    std::thread::sleep(Duration::from_secs(1));
    let listed = agent.processes().len();
    assert!(listed < 10, "{listed} processes listed after all exited");
    still_measures_correctly(&agent, &python);
}

#[test]
fn busy_port_is_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_pymem"))
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on 127.0.0.1"), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A starved agent (stopped while events pile up) with a one-page ring
/// buffer: the overflow is counted and exported, and the agent recovers.
#[test]
fn full_ring_buffer_drops_are_counted_and_exported() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&["--ring-buffer-bytes", "4096"]);
    let agent_pid = agent_pid(&agent);
    unsafe { libc::kill(agent_pid as i32, libc::SIGSTOP) };
    // Each exec is an event; a few hundred overflow one page (~85 events).
    let mut children: Vec<_> = (0..300)
        .map(|_| Command::new("/bin/true").spawn().unwrap())
        .collect();
    for child in &mut children {
        child.wait().unwrap();
    }
    unsafe { libc::kill(agent_pid as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(2));
    let metrics = agent.metrics();
    let lost: f64 = metrics
        .lines()
        .find(|l| l.starts_with("pymem_events_lost_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pymem_events_lost_total in\n{metrics}"));
    assert!(
        lost > 0.0,
        "no drops counted after a 300-exec burst:\n{metrics}"
    );
    // The same drops, as the ring buffer's own kernel-error series.
    let ring_errors = r#"pymem_kernel_errors_total{map="EVENTS"} "#;
    let ring_errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(ring_errors))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {ring_errors} in\n{metrics}"));
    assert_eq!(ring_errors, lost, "{metrics}");
    still_measures_correctly(&agent, &python);
}

fn agent_pid(agent: &Agent) -> u32 {
    agent.child_pid()
}
