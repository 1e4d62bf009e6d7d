//! `pymem run` and `pymem record` end to end, as root: the real binary with
//! its embedded observer around real Python scripts. Ground truth comes
//! from the scripts: their leaking line, the bytes they report leaking,
//! their own exit statuses.

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::common::{Agent, pyenv, source_line};
use serde_json::Value;

const PYMEM: &str = env!("CARGO_BIN_EXE_pymem");
/// `pymem run`'s status when a check failed (docs/commands.md).
const CHECK_FAILED: i32 = 99;

/// Appends ~2.5 MB/s of strings to a module-level list for `argv[1]`
/// seconds, then prints the bytes it holds (`sys.getsizeof`).
const LEAKY: &str = r#"
import sys, time
LEAKED = []


def leak(i):
    LEAKED.append("x" * 200 + str(i))  # LEAK


end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    for _ in range(500):
        leak(i)
        i += 1
    time.sleep(0.05)
print("leaked", sum(sys.getsizeof(s) for s in LEAKED), flush=True)
"#;

/// Allocates as much as LEAKY, and drops it each round.
const CHURN: &str = r#"
import sys, time


def churn(i):
    batch = ["x" * 200 + str(i + j) for j in range(500)]
    return len(batch)


end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    i += churn(i)
    time.sleep(0.05)
print("churned", i, flush=True)
"#;

/// A pre-fork server: four workers, the third of which leaks; each prints
/// its pid and role.
const PREFORK: &str = r#"
import os, sys, time
CACHE = []


def serve(leaks):
    end = time.time() + float(sys.argv[1])
    i = 0
    while time.time() < end:
        for _ in range(500):
            if leaks:
                CACHE.append("y" * 200 + str(i))  # LEAK
            else:
                item = "y" * 200 + str(i)
            i += 1
        time.sleep(0.05)


children = []
for n in range(4):
    pid = os.fork()
    if pid == 0:
        role = "leaks" if n == 2 else "steady"
        os.write(1, f"worker {os.getpid()} {role}\n".encode())
        serve(n == 2)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"#;

/// Waits for SIGINT (KeyboardInterrupt) or SIGTERM and exits with a status
/// of its own for each.
const WAITER: &str = r#"
import signal, sys, time


def on_term(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(43)


signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("got SIGINT", flush=True)
    sys.exit(42)
sys.exit(0)
"#;

fn python() -> Option<PathBuf> {
    pyenv("3.11")
}

/// `pymem run` with the test's observer settings, in `dir`, in a process
/// group of its own (so that a signal to the group reaches pymem and
/// nothing else of the test).
fn pymem_run(dir: &Path, options: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(PYMEM);
    cmd.current_dir(dir)
        .arg("run")
        .args([
            "--embedded",
            "--probe-delay",
            "2s",
            "--sample-interval",
            "500ms",
        ])
        .args(options)
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd
}

fn write_script(dir: &Path, name: &str, source: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path.to_string_lossy().into_owned()
}

fn output_of(mut cmd: Command) -> (Output, Duration) {
    let started = Instant::now();
    let output = cmd.output().expect("running pymem");
    (output, started.elapsed())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn leak_line(script: &str) -> i64 {
    source_line(script, "the # LEAK marker", |l| l.contains("# LEAK"))
}

#[test]
fn a_leak_fails_the_run_and_names_its_line() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "leaky.py", LEAKY);
    let line = leak_line(&script);
    let json = dir.path().join("summary.json");
    let report = dir.path().join("report.html");
    let (output, took) = output_of(pymem_run(
        dir.path(),
        &[
            "--fail-on-leak",
            "--warmup",
            "5s",
            "--format",
            "github",
            "--json",
            json.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[python.to_str().unwrap(), "-u", &script, "18"],
    ));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    eprintln!("took {took:?}\n{stderr}\n{stdout}");
    assert_eq!(output.status.code(), Some(CHECK_FAILED), "{stderr}");
    let named = format!("leak ({script}:{line}");
    assert!(stderr.contains("check failed"), "{stderr}");
    assert!(stderr.contains(&named), "stderr names {named}: {stderr}");

    let summary = read_json(&json);
    assert_eq!(summary["exit_status"], 0, "the script itself succeeded");
    let process = &summary["processes"][0];
    assert_eq!(process["verdict"]["kind"], "leak", "{process:#}");
    let top = &process["growing_sites"][0];
    assert_eq!(top["function"], "leak");
    assert_eq!(top["line"], line);
    // The heap grew by what the script says it leaked (its strings; the
    // list's pointers and arena slack come on top).
    let leaked: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("leaked "))
        .expect("the script's total")
        .trim()
        .parse()
        .unwrap();
    let samples = process["samples"].as_array().unwrap();
    let first = samples[0]["heap_bytes"].as_f64().unwrap();
    let grown = process["final_heap_bytes"].as_f64().unwrap() - first;
    eprintln!("leaked {leaked} bytes, heap grew {grown}");
    assert!(
        grown > leaked * 0.8 && grown < leaked * 1.4,
        "heap grew {grown} for {leaked} leaked"
    );

    // One annotation, at the leaking line, relative to the checkout (the
    // working directory), in the workflow command syntax.
    let annotations: Vec<&str> = stdout.lines().filter(|l| l.starts_with("::")).collect();
    assert_eq!(annotations.len(), 1, "{stdout}");
    let annotation = annotations[0];
    let prefix = format!("::error file=leaky.py,line={line},title=pymem%3A memory leak::");
    assert!(annotation.starts_with(&prefix), "{annotation}");
    let message = &annotation[prefix.len()..];
    assert!(!message.is_empty() && !message.contains('\r'));
    assert!(message.contains("leak holds +"), "{message}");

    let page = std::fs::read_to_string(&report).unwrap();
    assert!(page.contains("leak window"));
    assert!(page.contains(&format!("{script}:{line}")));
}

#[test]
fn churn_of_the_same_size_passes() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "churn.py", CHURN);
    let json = dir.path().join("summary.json");
    let (output, took) = output_of(pymem_run(
        dir.path(),
        &[
            "--fail-on-leak",
            "--warmup",
            "5s",
            "--json",
            json.to_str().unwrap(),
        ],
        &[python.to_str().unwrap(), "-u", &script, "18"],
    ));
    let stderr = text(&output.stderr);
    eprintln!("took {took:?}\n{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(text(&output.stdout).contains("churned"));
    let summary = read_json(&json);
    let process = &summary["processes"][0];
    assert_eq!(
        process["verdict"]["leaking"], false,
        "{:#}",
        process["verdict"]
    );
    assert!(summary["failures"].as_array().unwrap().is_empty());
}

#[test]
fn the_commands_own_status_passes_through() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    let python = python.to_str().unwrap();
    let (output, _) = output_of(pymem_run(
        dir.path(),
        &["--fail-on-leak"],
        &[python, "-c", "import sys; print('bye'); sys.exit(7)"],
    ));
    assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "bye\n", "stdout passes through as is");
    let (output, _) = output_of(pymem_run(dir.path(), &[], &["/nonexistent/command"]));
    assert_eq!(output.status.code(), Some(127), "{}", text(&output.stderr));
}

/// Starts WAITER under `pymem run` and waits for its "ready".
fn start_waiter(dir: &Path, python: &Path) -> (Child, BufReader<std::process::ChildStdout>) {
    let script = write_script(dir, "waiter.py", WAITER);
    let mut child = pymem_run(dir, &[], &[python.to_str().unwrap(), "-u", &script])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    (child, stdout)
}

fn finish(mut child: Child, mut stdout: BufReader<std::process::ChildStdout>) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pymem run did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    (status.code().unwrap_or(-1), rest)
}

#[test]
fn ctrl_c_and_sigterm_reach_the_command() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    // Ctrl-C: SIGINT to pymem's process group, as a terminal sends it.
    let (child, stdout) = start_waiter(dir.path(), &python);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let (status, rest) = finish(child, stdout);
    assert_eq!((status, rest.as_str()), (42, "got SIGINT\n"));
    // SIGTERM to pymem alone (a supervisor stopping it).
    let (child, stdout) = start_waiter(dir.path(), &python);
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (status, rest) = finish(child, stdout);
    assert_eq!((status, rest.as_str()), (43, "got SIGTERM\n"));
}

#[test]
fn the_leaking_worker_of_a_pre_fork_server_is_named() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "prefork.py", PREFORK);
    let line = leak_line(&script);
    let json = dir.path().join("summary.json");
    let (output, took) = output_of(pymem_run(
        dir.path(),
        &[
            "--fail-on-leak",
            "--warmup",
            "5s",
            "--no-census",
            "--json",
            json.to_str().unwrap(),
        ],
        &[python.to_str().unwrap(), "-u", &script, "16"],
    ));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    eprintln!("took {took:?}\n{stderr}\n{stdout}");
    assert_eq!(output.status.code(), Some(CHECK_FAILED), "{stderr}");
    let leaker: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("worker ")?.strip_suffix(" leaks"))
        .expect("the leaking worker's pid")
        .parse()
        .unwrap();
    let summary = read_json(&json);
    let failures = summary["failures"].as_array().unwrap();
    let failed: Vec<u64> = failures
        .iter()
        .map(|f| f["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        failed,
        [leaker],
        "only the leaking worker fails: {failures:#?}"
    );
    let processes = summary["processes"].as_array().unwrap();
    assert!(
        processes.len() >= 5,
        "the parent and four workers: {}",
        processes.len()
    );
    let worker = processes
        .iter()
        .find(|p| p["pid"].as_u64() == Some(leaker))
        .unwrap();
    assert_eq!(
        worker["growing_sites"][0]["line"], line,
        "{:#}",
        worker["growing_sites"]
    );
    assert!(stderr.contains(&format!("pid {leaker} (")));
}

#[test]
fn record_judges_a_running_process() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "leaky.py", LEAKY);
    let line = leak_line(&script);
    let mut leaky = Command::new(&python)
        .args(["-u", &script, "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let json = dir.path().join("summary.json");
    let pid = leaky.id().to_string();
    let output = Command::new(PYMEM)
        .args([
            "record",
            &pid,
            "--duration",
            "14s",
            "--embedded",
            "--fail-on-leak",
        ])
        .args(["--warmup", "4s", "--sample-interval", "500ms", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let _ = leaky.kill();
    let _ = leaky.wait();
    let stderr = text(&output.stderr);
    eprintln!("{stderr}");
    assert_eq!(output.status.code(), Some(CHECK_FAILED), "{stderr}");
    let summary = read_json(&json);
    let process = &summary["processes"][0];
    assert_eq!(process["pid"].as_u64(), Some(u64::from(leaky.id())));
    assert_eq!(process["growing_sites"][0]["line"], line);
}

#[test]
fn run_reads_a_running_agent_when_one_answers() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    let agent = Agent::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "leaky.py", LEAKY);
    let line = leak_line(&script);
    let json = dir.path().join("summary.json");
    let url = agent.url("");
    let output = Command::new(PYMEM)
        .current_dir(dir.path())
        .args(["run", "--agent", &url, "--fail-on-leak", "--warmup", "4s"])
        .args(["--max-heap", "4GiB", "--json"])
        .arg(&json)
        .arg("--")
        .args([python.to_str().unwrap(), "-u", &script, "14"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    eprintln!("{stderr}");
    assert_eq!(output.status.code(), Some(CHECK_FAILED), "{stderr}");
    let summary = read_json(&json);
    assert!(
        summary["source"].as_str().unwrap().starts_with("agent "),
        "{}",
        summary["source"]
    );
    let checks: Vec<&str> = summary["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["leak"], "the generous --max-heap passes");
    assert_eq!(summary["processes"][0]["growing_sites"][0]["line"], line);
}

/// Hosts Chromium itself asks (network time, component updates,
/// sign-in), whatever page it opens.
const BROWSER_OWN: [&str; 3] = [
    "clients2.google.com",
    "update.googleapis.com",
    "accounts.google.com",
];

/// Chromium's proxy: every request the browser makes comes here first,
/// and is listed (its request line) and refused.
fn listing_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let listed = requests.clone();
    std::thread::spawn(move || {
        for connection in listener.incoming().flatten() {
            let _ = connection.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new(connection).read_line(&mut line);
            listed.lock().unwrap().push(line.trim().to_string());
        }
    });
    (port, requests)
}

fn chromium(profile: &Path, proxy: u16, args: &[&str]) -> Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1800",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--proxy-server=http://127.0.0.1:{proxy}"))
        // Loopback too: nothing the page asks for may bypass the count.
        .arg("--proxy-bypass-list=<-loopback>")
        .args(args)
        .output()
        .expect("running chromium")
}

#[test]
fn the_report_renders_in_headless_chromium_without_network() {
    let Some(python) = python() else {
        return eprintln!("skipped: no pyenv 3.11");
    };
    if Command::new("chromium").arg("--version").output().is_err() {
        panic!("chromium is missing: run `cargo xtask setup`");
    }
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "leaky.py", LEAKY);
    let line = leak_line(&script);
    let report = dir.path().join("report.html");
    let (output, _) = output_of(pymem_run(
        dir.path(),
        &["--warmup", "3s", "--report", report.to_str().unwrap()],
        &[python.to_str().unwrap(), "-u", &script, "10"],
    ));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let url = format!("file://{}", report.display());
    let (proxy, requests) = listing_proxy();

    let dom = chromium(
        &dir.path().join("profile-dom"),
        proxy,
        &["--dump-dom", &url],
    );
    let (html, log) = (text(&dom.stdout), text(&dom.stderr));
    assert!(dom.status.success(), "{log}");
    assert!(
        html.contains("data-rendered=\"true\""),
        "the page's script ran: {log}"
    );
    for error in ["Uncaught", "Refused to", "ERR_"] {
        let console: Vec<&str> = log.lines().filter(|l| l.contains(error)).collect();
        assert!(console.is_empty(), "console: {console:#?}");
    }
    assert!(
        html.contains("<polygon class=\"area src-arena\""),
        "heap chart"
    );
    assert!(html.contains("class=\"rss-line\""), "RSS chart");
    assert!(html.contains("leak window"));
    let flame = &html[html.find("<div class=\"flame\">").expect("flame graph")..];
    assert!(
        flame.contains(&format!("leak ({script}:{line})")),
        "the leak's frame"
    );

    let shot = dir.path().join("report.png");
    let screenshot = chromium(
        &dir.path().join("profile-shot"),
        proxy,
        &[&format!("--screenshot={}", shot.display()), &url],
    );
    assert!(screenshot.status.success(), "{}", text(&screenshot.stderr));
    let (colours, inked) = png_ink(&std::fs::read(&shot).unwrap());
    eprintln!(
        "screenshot: {colours} colours, {:.1}% of pixels off the background",
        inked * 100.0
    );
    assert!(
        colours > 50 && inked > 0.05,
        "not blank: {colours} colours, {inked}"
    );
    let page_requests: Vec<String> = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !BROWSER_OWN.iter().any(|host| r.contains(host)))
        .cloned()
        .collect();
    assert!(
        page_requests.is_empty(),
        "network requests: {page_requests:#?}"
    );

    // The checks do see what a bad page does: a page with one image from
    // the network and a script error is caught on both counts.
    let control = dir.path().join("control.html");
    std::fs::write(
        &control,
        "<img src=\"http://pymem-test.invalid/x.png\"><script>undefined_function()</script>",
    )
    .unwrap();
    let url = format!("file://{}", control.display());
    let bad = chromium(
        &dir.path().join("profile-control"),
        proxy,
        &["--dump-dom", &url],
    );
    let caught = requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.contains("pymem-test.invalid"));
    assert!(caught, "the proxy missed the control page's request");
    assert!(
        text(&bad.stderr).contains("Uncaught"),
        "the console log missed the control page's error"
    );
}

/// Distinct colours of a PNG and the share of its pixels that differ from
/// its top-left one (the background): decoded here (zlib and the five row
/// filters) so that the check depends on nothing of pymem's.
fn png_ink(png: &[u8]) -> (usize, f64) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (mut width, mut height, mut channels, mut idat) = (0, 0, 0, Vec::new());
    let mut at = 8;
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let kind = &png[at + 4..at + 8];
        let data = &png[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                height = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "8-bit channels");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    other => panic!("colour type {other}"),
                };
                assert_eq!(data[12], 0, "not interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = width * channels;
    let mut pixels = vec![0u8; stride * height];
    for y in 0..height {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= channels {
                pixels[y * stride + x - channels]
            } else {
                0
            };
            let b = if y > 0 {
                pixels[(y - 1) * stride + x]
            } else {
                0
            };
            let c = if x >= channels && y > 0 {
                pixels[(y - 1) * stride + x - channels]
            } else {
                0
            };
            let predicted = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                4 => {
                    let p = i16::from(a) + i16::from(b) - i16::from(c);
                    let (pa, pb, pc) = (
                        (p - i16::from(a)).abs(),
                        (p - i16::from(b)).abs(),
                        (p - i16::from(c)).abs(),
                    );
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("row filter {other}"),
            };
            pixels[y * stride + x] = line[x].wrapping_add(predicted);
        }
    }
    let background = &pixels[..channels];
    let mut colours = std::collections::HashSet::new();
    let mut inked = 0usize;
    for pixel in pixels.chunks(channels) {
        colours.insert(pixel.to_vec());
        if pixel != background {
            inked += 1;
        }
    }
    (colours.len(), inked as f64 / (width * height) as f64)
}
