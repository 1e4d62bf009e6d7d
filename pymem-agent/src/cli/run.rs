//! `pymem run -- CMD` and `pymem record PID...`: record Python processes
//! for the length of a command (or a while), then print what their heaps
//! did, judge the checks, and write the JSON summary, the GitHub
//! annotations and the HTML report asked for.
use std::{
    ffi::OsString,
    io::Write as _,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    client::{AgentClient, Caller, is_refusal},
    observer::config::ObserveArgs,
    recording::{
        Checks, Recorder, Recording, RunSummary,
        summary::{self, ProcessOutcome},
        units::{self, Warmup},
    },
    report,
    top::source::{EmbeddedObserver, Source},
};

/// The exit status when a check failed (`--fail-on-leak`, `--max-heap`,
/// `--max-growth`); chosen to stay clear of the usual statuses of test
/// runners (0-5) and of signals (128 + N).
pub const CHECK_FAILED_STATUS: i32 = 99;

/// Options shared by `pymem run` and `pymem record`.
#[derive(clap::Args, Debug)]
pub struct RecordOptions {
    /// Fail (exit status 99) when a process's heap keeps growing after
    /// the warm-up; a plateau or churn does not fail.
    #[arg(long)]
    pub fail_on_leak: bool,
    /// What the verdict leaves out at the start of each process: a share
    /// of the run (`25%`) or a time (`10s`).
    #[arg(long, value_name = "SHARE|DURATION", default_value = "25%", value_parser = units::parse_warmup)]
    pub warmup: Warmup,
    /// Fail when a process's heap goes over SIZE (e.g. 500MiB, 2GB).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    pub max_heap: Option<u64>,
    /// Fail when a process's heap grows faster than RATE after the warm-up
    /// (e.g. 2MiB/min, 100KiB/s).
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    pub max_growth: Option<f64>,
    /// Write the summary as JSON to FILE (with every sample).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// `github` also prints GitHub Actions annotations (`::error
    /// file=…,line=…::…`) at the lines of the failed checks, on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// No object censuses (they pause each process briefly every few
    /// seconds; without them there are no growing types).
    #[arg(long)]
    pub no_census: bool,
    /// pymem agent to read from [default: http://127.0.0.1:9477, and when
    /// no agent answers there, observe from this process (root)].
    /// A protected agent (--web-config-file) takes https:// and basic auth
    /// credentials from PYMEM_AGENT_USER and PYMEM_AGENT_PASSWORD (better
    /// for the password than https://USER:PASS@HOST:PORT, which `ps`
    /// shows).
    #[arg(long, value_name = "URL")]
    pub agent: Option<String>,
    #[command(flatten)]
    pub ca: crate::cli::AgentCaFile,
    /// Observe from this process even if an agent is running.
    #[arg(long, conflicts_with = "agent")]
    pub embedded: bool,
    #[command(
        flatten,
        next_help_heading = "Embedded observer (when no agent answers)"
    )]
    pub observe: ObserveArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Github,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub options: RecordOptions,
    /// The command to run, with its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Running processes to record (with their descendants).
    #[arg(required = true, value_name = "PID")]
    pub pids: Vec<u32>,
    /// How long to record [default: until they exit or Ctrl-C].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub options: RecordOptions,
}

/// Runs the command under observation; the exit status to end with.
pub fn run_command(args: RunArgs) -> Result<i32> {
    quiet_logging();
    let options = &args.options;
    let source = connect(options)?;
    signals::install();
    let started = Instant::now();
    let mut child = match spawn(&args.command) {
        Ok(child) => child,
        Err(e) => {
            eprintln!("pymem run: cannot run {:?}: {e}", args.command[0]);
            return Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let child_pid = child.id();
    let mut recorder = Recorder::new(&source, vec![child_pid], started);
    let status = record_while(&source, &mut recorder, options, |_| {
        for signal in signals::take() {
            // The command runs in its own process group (see `spawn`):
            // what reaches pymem is passed on to all of it.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-(child_pid as i32), signal) };
        }
        exited(child_pid)
    });
    signals::restore_terminal();
    let status = match status {
        Some(status) => status,
        None => child.wait().context("waiting for the command")?,
    };
    let exit = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let target = args
        .command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let summary = summarize(recorder, &source, options, target, Some(exit));
    let status = finish(&summary, options, exit);
    leave_probes_to_the_kernel(source);
    status
}

/// Records running processes; the exit status to end with.
pub fn run_record(args: RecordArgs) -> Result<i32> {
    quiet_logging();
    let options = &args.options;
    for pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process {pid}");
        }
    }
    let source = connect(options)?;
    signals::install();
    let started = Instant::now();
    let roots = args.pids.clone();
    let mut recorder = Recorder::new(&source, roots.clone(), started);
    eprintln!(
        "pymem record: recording {} ({}){}",
        join_pids(&roots),
        source.describe(),
        args.duration
            .map_or(" until they exit or Ctrl-C".to_string(), |d| format!(
                " for {}",
                humantime::format_duration(d)
            ))
    );
    record_while(&source, &mut recorder, options, |recorder| {
        let interrupted = !signals::take().is_empty();
        let over = args.duration.is_some_and(|d| started.elapsed() >= d);
        let gone = roots
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            && recorder.alive().is_empty();
        (interrupted || over || gone).then_some(())
    });
    let target = format!("pymem record {}", join_pids(&roots));
    let summary = summarize(recorder, &source, options, target, None);
    let status = finish(&summary, options, 0);
    leave_probes_to_the_kernel(source);
    status
}

/// Does not stop the embedded observer: detaching its probes one by one
/// takes seconds per process observed on the host, while the kernel drops
/// them all when this process exits, which it is about to.
fn leave_probes_to_the_kernel(source: Source) {
    std::mem::forget(source);
}

fn join_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls the source every sample interval (censuses on a thread of their
/// own) until `done` says so; `done` is asked every 50 ms.
/// The command's exit status once it has ended. Not `Child::try_wait`: a
/// census pauses the command with ptrace from another thread of this
/// process, and a plain waitpid here would take that ptrace stop for an
/// end (a status that is neither an exit nor a signal).
fn exited(pid: u32) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status = 0;
    // SAFETY: waitpid writes only `status`. __WNOTHREAD: only children of
    // this thread, which spawned the command, not the census thread's
    // tracees.
    let waited =
        unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG | libc::__WNOTHREAD) };
    (waited == pid as i32 && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)))
        .then(|| std::process::ExitStatus::from_raw(status))
}

fn record_while<T>(
    source: &Source,
    recorder: &mut Recorder,
    options: &RecordOptions,
    mut done: impl FnMut(&Recorder) -> Option<T>,
) -> Option<T> {
    let interval = options
        .observe
        .sample_interval
        .max(Duration::from_millis(100));
    let shelf = recorder.census_shelf();
    let started = recorder.started();
    std::thread::scope(|scope| {
        if !options.no_census {
            let shelf = shelf.clone();
            scope.spawn(move || Recorder::census_loop(source, &shelf, started));
        }
        let mut next = Instant::now();
        let result = loop {
            if Instant::now() >= next {
                recorder.poll();
                next += interval;
            }
            if let Some(result) = done(recorder) {
                break Some(result);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        shelf.stop();
        result
    })
}

fn summarize(
    recorder: Recorder,
    source: &Source,
    options: &RecordOptions,
    target: String,
    exit_status: Option<i32>,
) -> RunSummary {
    let duration = recorder.seconds();
    let recordings = recorder.finish();
    let policy = options.observe.observer_config().policy;
    let processes: Vec<ProcessOutcome> = recordings
        .values()
        .filter(|r: &&Recording| !r.samples.is_empty())
        .map(|r| summary::outcome(r, duration, options.warmup, &policy))
        .collect();
    let checks = Checks {
        fail_on_leak: options.fail_on_leak,
        max_heap_bytes: options.max_heap,
        max_growth_bytes_per_second: options.max_growth,
    };
    RunSummary {
        target,
        source: source.describe(),
        duration_seconds: duration,
        exit_status,
        warmup: options.warmup.to_string(),
        checks,
        failures: summary::failures(&processes, &checks),
        processes,
    }
}

/// Prints and writes what was asked for; the exit status: `passed` when
/// every check passed, else `CHECK_FAILED_STATUS`.
fn finish(summary: &RunSummary, options: &RecordOptions, passed: i32) -> Result<i32> {
    eprint!("{}", summary::render_text(summary));
    if let Some(path) = &options.json {
        let json = serde_json::to_vec_pretty(summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("pymem: wrote the summary to {}", path.display());
    }
    if let Some(path) = &options.report {
        std::fs::write(path, report::html(summary))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("pymem: wrote the report to {}", path.display());
    }
    if options.format == OutputFormat::Github {
        let cwd = std::env::current_dir().unwrap_or_default();
        let mut out = std::io::stdout().lock();
        out.write_all(summary::github_annotations(summary, &cwd).as_bytes())?;
        out.flush()?;
    }
    Ok(if summary.failed() {
        CHECK_FAILED_STATUS
    } else {
        passed
    })
}

/// Warnings only (unless RUST_LOG asks for more): the command's own output
/// shares the terminal.
fn quiet_logging() {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The agent at `--agent` (which must answer), else the default agent if
/// it answers, else an embedded observer.
fn connect(options: &RecordOptions) -> Result<Source> {
    let embedded = || -> Result<Source> {
        let mut config = options.observe.observer_config();
        // The recording censuses its own processes (which also measures
        // what they held before); a census of every other Python process
        // on the host would only queue ahead of them.
        config.census.baseline = false;
        Ok(Source::Embedded(EmbeddedObserver::start(config)?))
    };
    if options.embedded {
        return embedded();
    }
    let target = options.ca.target(options.agent.as_deref());
    let agent = AgentClient::new(target, Caller::Command)?;
    let url = agent.base_url().to_string();
    match agent.processes() {
        Ok(_) => Ok(Source::Agent(agent)),
        // An agent that wants credentials or another CA says so itself.
        Err(e) if is_refusal(&e) => Err(e),
        Err(e) if options.agent.is_some() => {
            Err(e.context(format!("no pymem agent answered at {url}")))
        }
        Err(_) => embedded().with_context(|| {
            format!("no pymem agent answered at {url}, and observing from this process failed")
        }),
    }
}

/// Starts the command with pymem's stdio and environment, in a process
/// group of its own so that signals reach all of it once: on a terminal
/// that group is made the foreground one (Ctrl-C goes straight to it, as a
/// shell does with a job); elsewhere pymem passes on what it receives.
fn spawn(command: &[OsString]) -> std::io::Result<Child> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).process_group(0);
    let foreground = signals::owns_terminal();
    // SAFETY: the closure only makes async-signal-safe calls (sigprocmask,
    // tcsetpgrp, getpid), as required between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if foreground {
                signals::take_terminal();
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    if foreground {
        signals::give_terminal(child.id() as i32);
    }
    Ok(child)
}

/// Signals for pymem while it records: noted in a mask, acted on by the
/// recording loop (no work in the handler).
mod signals {
    use super::*;

    const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

    static PENDING: AtomicU64 = AtomicU64::new(0);
    static HAD_TERMINAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    extern "C" fn note(signal: libc::c_int) {
        PENDING.fetch_or(1 << signal, Ordering::SeqCst);
    }

    /// Catches the forwarded signals (a caught signal is reset to its
    /// default in the command at exec, so the command sees them as usual).
    pub fn install() {
        for signal in FORWARDED {
            // SAFETY: `note` is async-signal-safe (one atomic operation);
            // the sigaction struct is zeroed and then filled in.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = note as *const () as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    }

    /// The signals received since the last call.
    pub fn take() -> Vec<libc::c_int> {
        let pending = PENDING.swap(0, Ordering::SeqCst);
        FORWARDED
            .into_iter()
            .filter(|s| pending & (1 << s) != 0)
            .collect()
    }

    /// Whether stdin is a terminal whose foreground group is pymem's.
    pub fn owns_terminal() -> bool {
        // SAFETY: plain queries on fd 0.
        unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
    }

    /// In the command, between fork and exec: its new group takes the
    /// terminal (SIGTTOU blocked, since it asks from the background).
    pub fn take_terminal() {
        // SAFETY: async-signal-safe calls on a set built on the stack.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTTOU);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            libc::tcsetpgrp(0, libc::getpid());
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
    }

    /// In pymem: the same from this side (whichever runs first wins the
    /// race harmlessly, as in shells).
    pub fn give_terminal(group: libc::pid_t) {
        HAD_TERMINAL.store(true, Ordering::SeqCst);
        with_ttou_blocked(|| {
            // SAFETY: tcsetpgrp on fd 0 with SIGTTOU blocked.
            unsafe { libc::tcsetpgrp(0, group) };
        });
    }

    /// Takes the terminal back once the command is done.
    pub fn restore_terminal() {
        if HAD_TERMINAL.load(Ordering::SeqCst) {
            with_ttou_blocked(|| {
                // SAFETY: as above.
                unsafe { libc::tcsetpgrp(0, libc::getpgrp()) };
            });
        }
    }

    fn with_ttou_blocked(f: impl FnOnce()) {
        // SAFETY: sigprocmask with sets built on the stack.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTTOU);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            f();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
    }
}
