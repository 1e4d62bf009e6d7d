//! What pymem infers about an interpreter from its binary (version, arena
//! size, free-threading) is checked; a wrong inference is refused or
//! reported with its reason, never turned into silent wrong numbers.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::common::{
    Agent, WORKLOAD, Workload,
    checks::Check,
    debian_python_3_11, pyenv,
    support::{CaseResult, clear_group},
};

/// Waits until the agent's log has a line with every one of `words`.
fn wait_for_log_line(agent: &Agent, words: &[&str], timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log();
        if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return Some(line.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Debian's 3.11 copied under the name `python3.10`: the binary says 3.11,
/// the name 3.10. The agent refuses to guess and names every source.
#[test]
fn interpreter_named_for_another_version_is_refused() {
    let debian = require!(debian_python_3_11(), "/usr/bin/python3.11");
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("python3.10");
    std::fs::copy(&debian, &renamed).unwrap();
    let agent = Agent::start(&[]);
    let work = Workload::spawn_with(Command::new(&renamed).arg("-u").arg(WORKLOAD));
    let pid = work.pid.to_string();
    let line = wait_for_log_line(
        &agent,
        &[&format!("pid {pid}:"), "version sources disagree"],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("no refusal logged for pid {pid}:\n{}", agent.log()));
    eprintln!("{line}");
    assert!(line.contains("file name says 3.10"), "{line}");
    assert!(line.contains("Py_Version says 3.11"), "{line}");
    assert!(
        agent.process(work.pid).is_none(),
        "a refused process is listed"
    );
}

/// The address of the interpreter's `mmap` PLT stub inside a process, from
/// objdump's naming of the stubs and the library's load address.
fn mmap_stub_address(pid: u32, library: &Path) -> u64 {
    let dis = Command::new("objdump")
        .args(["-d", "-j", ".plt", "-j", ".plt.sec"])
        .arg(library)
        .output()
        .expect("objdump (binutils)");
    let dis = String::from_utf8_lossy(&dis.stdout);
    let vaddr = dis
        .lines()
        .find(|l| l.ends_with("<mmap@plt>:") || l.ends_with("<mmap64@plt>:"))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no mmap@plt in {}", library.display()));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() >= 6 && fields[2] == "00000000" && Path::new(fields[5]) == library
        })
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap_or_else(|| panic!("{} is not mapped in {pid}", library.display()));
    // A shared library is linked at 0: its load address is its bias.
    base + vaddr
}

/// 20 arena-like mappings of 256 KiB through the interpreter's own `mmap`
/// stub of a 3.11 process, whose arenas are 1 MiB: exactly what a wrong
/// arena-size guess looks like at run time.
#[test]
fn arena_like_mappings_of_another_size_are_reported() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let library = std::fs::canonicalize(python.parent().unwrap().join("../lib"))
        .unwrap()
        .join("libpython3.11.so.1.0");
    let agent = Agent::start(&[]);
    let mut work = Workload::spawn(&python);
    let before = agent.wait_for(work.pid, Duration::from_secs(15));
    assert!(!before.arena_size_mismatch, "{before:?}");
    let stub = mmap_stub_address(work.pid, &library);
    let mapped = work.command(&format!("mmap_via {stub} 262144 20"));
    assert_eq!(mapped["mapped"], 20, "{mapped}");
    let line = wait_for_log_line(
        &agent,
        &[&format!("pid {}", work.pid), "arena size mismatch"],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no arena size warning:\n{}", agent.log()));
    eprintln!("{line}");
    assert!(
        line.contains("256 KiB") && line.contains("1024 KiB"),
        "{line}"
    );
    let after = agent.process(work.pid).unwrap();
    assert!(after.arena_size_mismatch, "{after:?}");
}

/// Free-threaded builds (3.13t/3.14t) use mimalloc, not pymalloc arenas:
/// the agent must refuse them by name with that reason. The result is
/// recorded for the support table either way.
#[test]
fn free_threaded_interpreters_are_refused_by_name() {
    clear_group("free-threaded");
    let found = test_interpreters::free_threaded();
    let mut row = CaseResult {
        id: "3.13t-3.14t".into(),
        python: "3.13t / 3.14t".into(),
        build: "free-threaded (PEP 703)".into(),
        runs_as: String::new(),
        not_run: None,
        checks: Vec::new(),
    };
    if found.is_empty() {
        let reason = "unsupported: mimalloc heaps, no pymalloc arenas; the agent refuses \
                      them by name. No free-threaded CPython is installable here (Debian \
                      trixie/sid ship no nogil package), so this is not tested";
        eprintln!("SKIP: no free-threaded interpreter here; {reason}");
        row.not_run = Some(reason.into());
        row.write("free-threaded");
        return;
    }
    let agent = Agent::start(&[]);
    for python in found {
        // A rootfs interpreter runs inside its root.
        let work = match python.to_string_lossy().split_once("/usr/bin/") {
            Some((root, name)) if root.contains(".cache/rootfs") => Workload::spawn_with(
                Command::new("chroot")
                    .arg(root)
                    .arg(format!("/usr/bin/{name}"))
                    .arg("-c")
                    .arg("import json,os,sys,time; print(json.dumps({'pid': os.getpid(), 'version': '%d.%d.%d' % sys.version_info[:3]}), flush=True); time.sleep(60)"),
            ),
            _ => Workload::spawn(&python),
        };
        let line = wait_for_log_line(
            &agent,
            &[&format!("pid {}", work.pid), "free-threaded"],
            Duration::from_secs(10),
        );
        let listed = agent.process(work.pid).is_some();
        let detail = format!("{}: {}", python.display(), line.clone().unwrap_or_default());
        row.runs_as = "host or chroot".into();
        row.checks.push(Check::new(
            "refused by name",
            line.is_some() && !listed,
            detail,
        ));
    }
    row.write("free-threaded");
    let failures = row.failures();
    assert!(failures.is_empty(), "{failures:#?}\n{}", agent.log());
}
