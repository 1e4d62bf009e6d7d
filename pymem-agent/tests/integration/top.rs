//! `pymem top` end to end, as root: the real binary in a real terminal
//! (tmux) and in `--once` mode, against real leaking Python processes.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::common::{Agent, pyenv, source_line};
use pymem_agent::model::ProcessInfo;
use serde_json::Value;

const PYMEM: &str = env!("CARGO_BIN_EXE_pymem");

/// Leaks small objects (pymalloc arenas: visible from the first sample) at
/// about 3 MB/s for `argv[1]` seconds, then idles. The leaking line is
/// marked for the allocation-site checks.
const LEAKER: &str = r#"
import sys, time
chain = None


def leak(i):
    global chain
    chain = [chain, "x" * 40 + str(i)]  # SITE: leak


end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    for _ in range(330):
        leak(i)
        i += 1
    time.sleep(0.02)
time.sleep(3600)
"#;

/// Allocates nothing after start-up: zero growth.
const IDLER: &str = "import time\ntime.sleep(3600)\n";

/// A Python interpreter binary (not a pyenv shim: its pid is the process).
fn python() -> Option<PathBuf> {
    pyenv("3.11").or_else(|| {
        let system = PathBuf::from("/usr/bin/python3");
        system.exists().then_some(system)
    })
}

/// A Python script in `dir`, killed on drop.
struct Script {
    child: Child,
    pid: u32,
}

impl Script {
    fn spawn(python: &Path, dir: &Path, name: &str, source: &str, args: &[&str]) -> Script {
        let path = dir.join(name);
        std::fs::write(&path, source).unwrap();
        let child = Command::new(python)
            .arg("-u")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning Python");
        Script {
            pid: child.id(),
            child,
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private tmux server (own socket, no user config) with one window,
/// killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `None` when tmux is not installed.
    fn start(name: &str, command: &str) -> Option<Tmux> {
        let socket = format!("pymem-test-{}-{name}", std::process::id());
        let tmux = Tmux { socket };
        let started = tmux
            .command()
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "40",
            ])
            .arg(command)
            .status();
        match started {
            Ok(status) if status.success() => Some(tmux),
            Ok(status) => panic!("tmux new-session failed: {status}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("running tmux: {e}"),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]);
        command
    }

    fn send_keys(&self, keys: &str) {
        let status = self
            .command()
            .args(["send-keys", "-t", "top", keys])
            .status()
            .unwrap();
        assert!(status.success(), "tmux send-keys {keys}");
    }

    fn capture(&self) -> String {
        let out = self
            .command()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen once `ready` holds for it.
    fn wait_for(&self, what: &str, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if ready(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("{what}: not on screen within {timeout:?}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

/// Index of the first screen line containing `needle`.
fn line_of(screen: &str, needle: &str) -> Option<usize> {
    screen.lines().position(|l| l.contains(needle))
}

fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen.lines().find(|l| l.contains(needle)).unwrap_or("")
}

/// `leaker.py:N` in `dir`: the leaking line, from the script's own source.
fn leak_location(dir: &Path) -> String {
    let path = dir.join("leaker.py");
    let line = source_line(path.to_str().unwrap(), "the leak", |l| {
        l.contains("# SITE: leak")
    });
    format!("{}:{line}", path.display())
}

/// The detail view of the leaker in `dir` once it lists the leaking line;
/// checks that the line is the heaviest site, with its function and bytes.
fn wait_for_leak_site(tmux: &Tmux, dir: &Path) -> String {
    let location = leak_location(dir);
    let screen = tmux.wait_for("the leak's site", Duration::from_secs(15), |s| {
        s.contains("Heap history") && s.contains(&location)
    });
    assert!(screen.contains("Top allocation sites · "), "{screen}");
    let header = line_of(&screen, "ALLOCATED").expect("sites table header");
    let heaviest = screen.lines().nth(header + 1).unwrap();
    assert!(
        heaviest.contains(&location) && heaviest.contains(" leak "),
        "the leak is the heaviest site:\n{screen}"
    );
    assert_eq!(
        heaviest.matches(" MiB").count(),
        2,
        "live and allocated bytes: {heaviest}"
    );
    screen
}

#[test]
fn tui_shows_a_leak_sorts_on_a_key_and_restores_the_terminal() {
    let python = require!(python(), "Python 3");
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[]);
    // The idler first, so it (usually) has the lower pid: sorting by pid
    // flips the growth order.
    let idler = Script::spawn(&python, dir.path(), "idler.py", IDLER, &[]);
    let leaker = Script::spawn(&python, dir.path(), "leaker.py", LEAKER, &["60"]);
    let lower_pid = if idler.pid < leaker.pid {
        "idler.py"
    } else {
        "leaker.py"
    };
    agent.wait_for(idler.pid, Duration::from_secs(5));
    agent.wait_for(leaker.pid, Duration::from_secs(5));

    // After pymem exits: its status, and whether the tty is back in
    // canonical (cooked) mode.
    let command = format!(
        "{PYMEM} top --agent {} --interval 500ms --filter {}; echo pymem-exit=$?; \
         if stty -a | grep -q -- -icanon; then echo term=raw; else echo term=cooked; fi; sleep 120",
        agent.url(""),
        dir.path().display()
    );
    let Some(tmux) = Tmux::start("tui", &command) else {
        eprintln!("SKIP: tmux is not installed here");
        return;
    };

    // The agent's 10 s window must fill before the leak is flagged.
    let screen = tmux.wait_for("leaking row flagged LEAK", Duration::from_secs(25), |s| {
        line_with(s, "leaker.py").contains("LEAK") && s.contains("idler.py")
    });
    eprintln!("pymem top, sorted by growth:\n{screen}");
    assert!(
        screen.contains(&format!("source: agent {}", agent.url(""))),
        "{screen}"
    );
    assert!(
        screen.contains("sort: growth ▼") && screen.contains("GROWTH ▼"),
        "{screen}"
    );
    assert!(
        screen.contains("q quit") && screen.contains("/ filter"),
        "help line:\n{screen}"
    );
    let leak_row = line_with(&screen, "leaker.py");
    assert!(leak_row.contains(&leaker.pid.to_string()), "{leak_row}");
    assert!(
        leak_row.contains(" MiB") && leak_row.contains("MiB/min"),
        "units: {leak_row}"
    );
    assert!(leak_row.contains('+'), "positive growth: {leak_row}");
    assert!(
        line_of(&screen, "leaker.py") < line_of(&screen, "idler.py"),
        "the leak leads by growth:\n{screen}"
    );

    tmux.send_keys("p");
    let screen = tmux.wait_for("sort by pid", Duration::from_secs(5), |s| {
        s.contains("sort: pid ▲") && s.contains("PID ▲")
    });
    let higher_pid = if lower_pid == "idler.py" {
        "leaker.py"
    } else {
        "idler.py"
    };
    assert!(
        line_of(&screen, lower_pid) < line_of(&screen, higher_pid),
        "lower pid first:\n{screen}"
    );

    tmux.send_keys("End");
    tmux.send_keys("Enter");
    let screen = wait_for_leak_site(&tmux, dir.path());
    eprintln!("pymem top, detail view:\n{screen}");
    assert!(screen.contains(&format!("pid {}", leaker.pid)), "{screen}");
    tmux.send_keys("Escape");
    tmux.wait_for("back to the table", Duration::from_secs(5), |s| {
        s.contains("HEAP HISTORY")
    });

    tmux.send_keys("q");
    let screen = tmux.wait_for("pymem exited", Duration::from_secs(10), |s| {
        s.contains("term=")
    });
    assert!(screen.contains("pymem-exit=0"), "{screen}");
    assert!(
        screen.contains("term=cooked"),
        "raw mode left on:\n{screen}"
    );
    assert!(
        !screen.contains("sort:"),
        "still on the alternate screen:\n{screen}"
    );
}

#[test]
fn tui_without_an_agent_lists_sites_from_its_own_observer() {
    let python = require!(python(), "Python 3");
    let dir = tempfile::tempdir().unwrap();
    let leaker = Script::spawn(&python, dir.path(), "leaker.py", LEAKER, &["60"]);
    let command = format!(
        "{PYMEM} top --embedded --interval 500ms --filter {}; echo pymem-exit=$?; sleep 120",
        dir.path().display()
    );
    let Some(tmux) = Tmux::start("embedded", &command) else {
        eprintln!("SKIP: tmux is not installed here");
        return;
    };
    tmux.wait_for("the leaker's row", Duration::from_secs(15), |s| {
        s.contains("source: embedded observer") && s.contains("leaker.py")
    });
    tmux.send_keys("Enter");
    let screen = wait_for_leak_site(&tmux, dir.path());
    eprintln!("pymem top --embedded, detail view:\n{screen}");
    assert!(screen.contains(&format!("pid {}", leaker.pid)), "{screen}");

    tmux.send_keys("q");
    let screen = tmux.wait_for("pymem exited", Duration::from_secs(15), |s| {
        s.contains("pymem-exit=")
    });
    assert!(screen.contains("pymem-exit=0"), "{screen}");
}

/// Runs `pymem top` with `args`.
fn pymem_top(args: &[&str]) -> Output {
    Command::new(PYMEM)
        .arg("top")
        .args(args)
        .output()
        .expect("running pymem top")
}

/// The process `pid` in `pymem top --once --json` output.
fn find_in_json(stdout: &[u8], pid: u32) -> Option<ProcessInfo> {
    let processes: Vec<ProcessInfo> =
        serde_json::from_slice(stdout).expect("--json prints a JSON array of the API's objects");
    processes.into_iter().find(|p| p.pid == pid)
}

#[test]
fn once_json_from_an_agent_shows_growth_within_10s_of_the_leak_starting() {
    let python = require!(python(), "Python 3");
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[]);
    let url = agent.url("");
    let started = Instant::now();
    let leaker = Script::spawn(&python, dir.path(), "leaker.py", LEAKER, &["30"]);
    let (found, stdout) = loop {
        let out = pymem_top(&["--once", "--json", "--agent", &url]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let found =
            find_in_json(&out.stdout, leaker.pid).filter(|p| p.growth_bytes_per_second > 0.0);
        if let Some(process) = found {
            break (process, out.stdout);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no positive growth for pid {} within 10 s:\n{}",
            leaker.pid,
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "growth {:.0} B/s after {:.1?}",
        found.growth_bytes_per_second,
        started.elapsed()
    );
    // The printed objects are the API's, checked on their raw JSON.
    let printed: Vec<Value> = serde_json::from_slice(&stdout).unwrap();
    let found = printed
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(leaker.pid)))
        .unwrap();
    assert!(
        found["heap_history"].is_array(),
        "the API's objects: {found}"
    );

    // The plain table, filtered to the leak.
    let filter = dir.path().to_str().unwrap();
    let out = pymem_top(&["--once", "--agent", &url, "--filter", filter]);
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "header and one row:\n{table}");
    assert!(lines[0].contains("GROWTH"), "{table}");
    assert!(
        lines[1].contains(&leaker.pid.to_string()) && lines[1].contains("MiB/min"),
        "{table}"
    );
    assert!(
        !table.contains('\u{1b}'),
        "no escape codes in --once output"
    );
}

/// Runs `pymem top` with `args` and notes when its JSON arrived: the
/// embedded observer's clean shutdown (detaching probes) comes after the
/// listing and is not part of it.
fn pymem_top_json_timed(args: &[&str]) -> (Vec<ProcessInfo>, Instant, Output) {
    let mut child = Command::new(PYMEM)
        .arg("top")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running pymem top");
    let stdout = child.stdout.take().unwrap();
    let listed = serde_json::Deserializer::from_reader(stdout)
        .into_iter::<Vec<ProcessInfo>>()
        .next();
    let arrived = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match listed {
        Some(Ok(processes)) => (processes, arrived, out),
        other => panic!("no JSON array on stdout ({other:?}); stderr:\n{stderr}"),
    }
}

#[test]
fn once_json_without_an_agent_observes_on_its_own() {
    let python = require!(python(), "Python 3");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let leaker = Script::spawn(&python, dir.path(), "leaker.py", LEAKER, &["30"]);
    let mut args = vec!["--once", "--json"];
    // An agent on the default port would be used instead; bypass it.
    if TcpStream::connect("127.0.0.1:9477").is_ok() {
        eprintln!("note: an agent runs on 127.0.0.1:9477; forcing --embedded");
        args.push("--embedded");
    }
    let (processes, arrived, out) = pymem_top_json_timed(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("observing from this process"), "{stderr}");
    let listed_after = arrived - started;
    let process = processes
        .into_iter()
        .find(|p| p.pid == leaker.pid)
        .unwrap_or_else(|| panic!("pid {} not listed", leaker.pid));
    eprintln!(
        "growth {:.0} B/s listed after {listed_after:.1?}, exited after {:.1?}",
        process.growth_bytes_per_second,
        started.elapsed()
    );
    assert!(process.growth_bytes_per_second > 0.0, "{process:?}");
    assert!(
        listed_after < Duration::from_secs(10),
        "listed after {listed_after:?}"
    );
}

#[test]
fn embedded_observer_without_root_is_a_clear_error() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PYMEM])
        .args(["top", "--once", "--embedded"])
        .output();
    let Ok(out) = out else {
        eprintln!("SKIP: setpriv is not installed here");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
}
