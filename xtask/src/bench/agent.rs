//! The release agent as the benchmarks run it: on a free loopback port, its
//! log in a file, stopped with SIGTERM when done (or dropped on an error).
use std::{
    collections::HashSet,
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::api;
use crate::process::Supervised;

/// The agent detaches its probes on SIGTERM; give it time to.
const STOP_GRACE: Duration = Duration::from_secs(20);

pub struct RunningAgent {
    process: Supervised,
    addr: SocketAddr,
    log: PathBuf,
}

impl RunningAgent {
    /// Starts `pymem agent` with `extra_args`, appending its output to `log`.
    pub fn start(binary: &Path, log: &Path, extra_args: &[&str]) -> Result<Self> {
        let addr = free_loopback_addr()?;
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("agent")
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let process = Supervised::spawn(&mut command, "pymem agent", STOP_GRACE)?;
        Ok(Self {
            process,
            addr,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `/api/v1/processes`.
    pub fn processes(&self) -> Result<Value> {
        api::get_json(self.addr, "/api/v1/processes")
    }

    /// The agent's record of one process, if it observes it.
    pub fn process(&self, pid: u32) -> Result<Option<Value>> {
        let processes = self.processes()?;
        Ok(processes
            .as_array()
            .into_iter()
            .flatten()
            .find(|process| process["pid"].as_u64() == Some(u64::from(pid)))
            .cloned())
    }

    /// Waits until the API lists every pid in `pids` with all its probes
    /// attached (start-up over); returns how long that took.
    pub fn wait_until_observed(&mut self, pids: &[u32], timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if let Err(exited) = self.process.ensure_running() {
                bail!(
                    "{exited:#}; the end of its log, {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            // The HTTP server may not be up yet: retry until the deadline.
            let observed: HashSet<u32> = self
                .processes()
                .map(|list| api::pids_past_startup(&list).into_iter().collect())
                .unwrap_or_default();
            let missing = pids.iter().filter(|pid| !observed.contains(pid)).count();
            if missing == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "after {timeout:?}, {missing} of {} processes are not (fully) observed; see {}",
                    pids.len(),
                    self.log.display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after a grace period); returns
    /// how long the agent took to go, detaching its probes included.
    pub fn stop(self) -> Result<Duration> {
        let started = Instant::now();
        let status = self.process.stop()?;
        if !status.success() {
            eprintln!(
                "warning: the agent exited with {status} after {:.1} s; see {}",
                started.elapsed().as_secs_f64(),
                self.log.display()
            );
        }
        Ok(started.elapsed())
    }
}

/// The last lines of the agent's log, without a trailing backtrace (the
/// error that ended it comes just before).
fn log_tail(log: &Path) -> String {
    const LINES: usize = 12;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let before_backtrace = text
        .rsplit_once("Stack backtrace:")
        .map_or(text.as_str(), |(head, _)| head);
    let lines: Vec<&str> = before_backtrace.trim_end().lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// A loopback address nothing listens on right now.
fn free_loopback_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?)
}
