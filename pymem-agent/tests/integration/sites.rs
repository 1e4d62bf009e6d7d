//! Allocation sites against real Python processes: the exact source lines
//! of known leaks, read from the workload's own source.

use std::{
    io::{BufRead, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::{self, Agent, LEAKS, Leaker, debian_python_3_11, pyenv, site_line};
use pymem_agent::{model::Accounting, sites::Site};

fn find<'a>(sites: &'a [Site], function: &str) -> Option<(usize, &'a Site)> {
    sites
        .iter()
        .enumerate()
        .find(|(_, s)| s.function == function)
}

fn leaking_lines_are_top_sites(python: &Path) {
    let agent = Agent::start(&[]);
    let leaker = Leaker::start(python, &agent, Duration::from_secs(8));
    let pid = leaker.pid;
    let sites = agent.sites(pid);
    // The workload stays within the default probe budget: every block
    // outside pymalloc was seen, not just those before a switch.
    let accounting = agent.process(pid).unwrap().accounting;
    drop(leaker);
    assert_eq!(accounting, Accounting::Probes);
    let top: Vec<String> = sites
        .iter()
        .take(5)
        .map(|s| format!("{:?}:{} {:?} live={}", s.file, s.line, s.function, s.bytes))
        .collect();
    eprintln!("top sites: {top:#?}");
    for (function, marker) in LEAKS {
        let (rank, site) = find(&sites, function)
            .unwrap_or_else(|| panic!("{function} not among sites: {top:#?}"));
        assert!(rank < 3, "{function} ranked {rank}: {top:#?}");
        assert_eq!(site.line, site_line(marker), "{site:?}");
        assert!(site.file.ends_with("sites.py"), "{site:?}");
        assert!(site.bytes > 1 << 20, "{site:?}");
        let stack = &site.stack;
        assert_eq!(stack[0].function, function);
        assert!(stack.iter().any(|f| f.function == "main"), "{site:?}");
    }
    // Churn allocates and frees: it may appear, but holds almost nothing
    // (at most the arena pymalloc keeps around, and one being filled).
    if let Some((rank, site)) = find(&sites, "<listcomp>").or_else(|| find(&sites, "churn_only")) {
        assert!(rank >= 2, "churn ranked {rank}: {top:#?}");
        let live = site.bytes;
        assert!(live <= 2 << 20, "churn holds {live} bytes: {site:?}");
    }
}

test_each_interpreter!(leaking_lines_are_top_sites {
    leaking_lines_are_top_sites_pyenv_311 => pyenv("3.11"), "pyenv 3.11";
    leaking_lines_are_top_sites_debian_static_311 => debian_python_3_11(), "/usr/bin/python3.11";
    leaking_lines_are_top_sites_pyenv_313 => pyenv("3.13"), "pyenv 3.13";
    leaking_lines_are_top_sites_pyenv_312 => pyenv("3.12"), "pyenv 3.12";
    leaking_lines_are_top_sites_pyenv_310 => pyenv("3.10"), "pyenv 3.10";
    leaking_lines_are_top_sites_pyenv_39 => pyenv("3.9"), "pyenv 3.9";
    leaking_lines_are_top_sites_pyenv_38 => pyenv("3.8"), "pyenv 3.8";
});

/// A process over its probe budget is accounted by syscalls; libc maps each
/// block of 128 KiB or more on its own, and those keep their line.
#[test]
fn large_blocks_keep_their_site_under_syscall_accounting() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("big_blocks.py");
    std::fs::write(
        &script,
        "import sys, time\n\
         sys.stdin.readline()\n\
         for i in range(200000):\n    \
             b = bytes(4096 + (i & 1))  # spends the probe budget\n\
         print('spent', flush=True)\n\
         sys.stdin.readline()\n\
         kept = []\n\
         for i in range(120):\n    \
             kept.append(bytes(262144))  # SITE: big\n    \
             time.sleep(0.02)\n\
         print(sum(sys.getsizeof(b) for b in kept), flush=True)\n\
         sys.stdin.readline()\n",
    )
    .unwrap();
    let big_line = common::source_line(script.to_str().unwrap(), "SITE: big", |l| {
        l.contains("# SITE: big")
    });
    let agent = Agent::start(&[]);
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    agent.wait_for_probes(pid, Duration::from_secs(15));
    writeln!(stdin).unwrap();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "spent");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.process(pid).unwrap().accounting != Accounting::Syscalls {
        assert!(
            std::time::Instant::now() < deadline,
            "still not under syscall accounting:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    writeln!(stdin).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let truth: f64 = line.trim().parse().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let sites = agent.sites(pid);
    drop(stdin);
    let _ = child.wait();
    let (rank, site) = sites
        .iter()
        .enumerate()
        .find(|(_, s)| s.line == big_line)
        .unwrap_or_else(|| panic!("line {big_line} not among the sites: {sites:#?}"));
    assert_eq!(rank, 0, "{sites:#?}");
    // libc rounds each mapping up to whole pages (+1.6 % here).
    common::assert_within(site.bytes as f64, truth, 0.10, "big blocks' site");
}
