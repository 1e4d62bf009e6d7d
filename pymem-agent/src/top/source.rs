//! Where `pymem top` gets its processes (and the allocation sites of the
//! one in the detail view): a running agent over HTTP, or an observer
//! embedded in this process when no agent answers.
use std::{
    sync::{Arc, RwLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The oldest census the detail view's sites may come from.
const SITES_CENSUS_AGE: std::time::Duration = std::time::Duration::from_secs(30);

use anyhow::{Result, anyhow, bail};
use tokio::sync::oneshot;

use crate::{
    census::{CensusFailure, CensusReport},
    client::AgentClient,
    holders::HoldersReport,
    model::{OomKill, ProcessInfo, Snapshot},
    observer::{Observer, ObserverConfig, Query, QuerySender, SharedSnapshot},
    sites::Site,
};

pub enum Source {
    Agent(AgentClient),
    Embedded(EmbeddedObserver),
}

impl Source {
    pub fn fetch(&self) -> Result<Vec<ProcessInfo>> {
        match self {
            Self::Agent(agent) => agent.processes(),
            Self::Embedded(observer) => Ok(observer.processes()),
        }
    }

    /// Post-mortems of the Python processes killed for memory, newest first.
    pub fn oom_kills(&self) -> Result<Vec<OomKill>> {
        match self {
            Self::Agent(agent) => agent.oom_kills(),
            Self::Embedded(observer) => Ok(observer.oom_kills()),
        }
    }

    /// The sites of `pid` by heap state from an agent (a census at most
    /// `SITES_CENSUS_AGE` old, so that an open detail view pauses the
    /// process at most that often); None embedded, whose sites come from
    /// allocation samples.
    pub fn heap_state_sites(&self, pid: u32) -> Option<Result<Vec<Site>>> {
        match self {
            Self::Agent(agent) => Some(agent.sites(pid, SITES_CENSUS_AGE)),
            Self::Embedded(_) => None,
        }
    }

    /// The sites of `pid` from allocation samples (no census, no pause),
    /// heaviest live bytes first: what a recording reads every few seconds.
    pub fn allocation_sites(&self, pid: u32) -> Result<Vec<Site>> {
        match self {
            Self::Agent(agent) => Ok(agent
                .sites_report(
                    pid,
                    Duration::ZERO,
                    Some("allocation_samples"),
                    crate::sites::keys::GroupBy::App,
                )?
                .sites),
            Self::Embedded(observer) => observer.sites(pid),
        }
    }

    /// An object census of `pid` (see [`AgentClient::census`]).
    pub fn census(
        &self,
        pid: u32,
        max_age: Duration,
        growth: bool,
        limit: usize,
    ) -> Result<CensusReport> {
        match self {
            Self::Agent(agent) => agent.census(pid, max_age, growth, limit),
            Self::Embedded(observer) => observer.census(pid, max_age, growth, limit),
        }
    }

    /// What holds the memory of `pid` (see [`AgentClient::holders`]).
    pub fn holders(
        &self,
        pid: u32,
        max_age: Duration,
        limit: usize,
        depth: Option<usize>,
    ) -> Result<HoldersReport> {
        match self {
            Self::Agent(agent) => agent.holders(pid, max_age, limit, depth),
            Self::Embedded(observer) => {
                // The holders come with every census; its types are not needed.
                let report = observer.census(pid, max_age, false, 1)?;
                Ok(HoldersReport::new(&report.census, limit, depth))
            }
        }
    }

    /// One line for the header: which source and where.
    pub fn describe(&self) -> String {
        match self {
            Self::Agent(agent) => format!("agent {}", agent.base_url()),
            Self::Embedded(_) => "embedded observer".to_string(),
        }
    }
}

/// An observer running on its own thread and tokio runtime, publishing
/// into a snapshot this process reads. Dropping it stops the observer and
/// detaches its probes.
pub struct EmbeddedObserver {
    snapshot: SharedSnapshot,
    queries: QuerySender,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
    started: Instant,
    sample_interval: Duration,
}

impl EmbeddedObserver {
    /// Loads the probes (root only) and starts observing; errors if the
    /// probes cannot be loaded.
    pub fn start(config: ObserverConfig) -> Result<Self> {
        let snapshot: SharedSnapshot = Arc::new(RwLock::new(Snapshot::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let shared = snapshot.clone();
        let thread = std::thread::Builder::new()
            .name("pymem-observer".into())
            .spawn(move || observe(config, shared, ready_tx, shutdown_rx))?;
        match ready_rx.recv() {
            Ok(Ok(queries)) => Ok(Self {
                snapshot,
                queries,
                shutdown: Some(shutdown_tx),
                thread: Some(thread),
                started: Instant::now(),
                sample_interval: config.sample_interval,
            }),
            Ok(Err(e)) => Err(e.context(not_root_hint())),
            Err(_) => Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => anyhow!("the embedded observer thread died while starting"),
            }),
        }
    }

    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.snapshot
            .read()
            .expect("snapshot lock")
            .processes
            .clone()
    }

    pub fn oom_kills(&self) -> Vec<OomKill> {
        self.snapshot
            .read()
            .expect("snapshot lock")
            .oom_kills
            .clone()
    }

    /// Asks the observer (which owns the live attribution) for the sites
    /// of `pid`, as the agent's `/api/v1/processes/{pid}/sites` does.
    pub fn sites(&self, pid: u32) -> Result<Vec<Site>> {
        let (reply, answer) = oneshot::channel();
        self.queries
            .blocking_send(Query::Sites { pid, reply })
            .map_err(|_| anyhow!("the embedded observer stopped"))?;
        match answer.blocking_recv() {
            Ok(Some(sites)) => Ok(sites),
            Ok(None) => bail!("pid {pid} is not observed"),
            Err(_) => bail!("the embedded observer stopped"),
        }
    }

    /// Asks the observer for an object census of `pid`, as the agent's
    /// `/api/v1/processes/{pid}/census` does.
    pub fn census(
        &self,
        pid: u32,
        max_age: Duration,
        growth: bool,
        limit: usize,
    ) -> Result<CensusReport> {
        let (reply, answer) = oneshot::channel();
        self.queries
            .blocking_send(Query::Census {
                pid,
                max_age,
                reply,
            })
            .map_err(|_| anyhow!("the embedded observer stopped"))?;
        match answer.blocking_recv() {
            Ok(Ok(answer)) => Ok(CensusReport::new(&answer, growth, limit)),
            Ok(Err(CensusFailure::NotObserved)) => bail!("pid {pid} is not observed"),
            Ok(Err(CensusFailure::Unsupported(reason))) => {
                bail!("no object census of pid {pid}: {reason}")
            }
            Ok(Err(CensusFailure::Failed(reason))) => {
                bail!("the object census of pid {pid} failed: {reason}")
            }
            Err(_) => bail!("the embedded observer stopped"),
        }
    }

    /// Waits up to `timeout` for the observer to find `pid`.
    pub fn wait_for(&self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.processes().iter().any(|p| p.pid == pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Blocks until a snapshot is worth printing: discovery scans /proc in
    /// the background, and a growth rate needs a few samples of a process.
    pub fn wait_until_sampled(&self) {
        const DISCOVERY: Duration = Duration::from_secs(2);
        const MIN_SAMPLES: usize = 2;
        let grace_end = self.started + DISCOVERY;
        let deadline = grace_end + self.sample_interval * MIN_SAMPLES as u32;
        std::thread::sleep(grace_end.saturating_duration_since(Instant::now()));
        while Instant::now() < deadline {
            let processes = self.processes();
            if !processes.is_empty()
                && processes
                    .iter()
                    .all(|p| p.heap_history.len() >= MIN_SAMPLES)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EmbeddedObserver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The observer thread: reports whether the probes loaded (with the
/// channel for queries), then observes until shut down.
fn observe(
    config: ObserverConfig,
    snapshot: SharedSnapshot,
    ready: std::sync::mpsc::Sender<Result<QuerySender>>,
    shutdown: oneshot::Receiver<()>,
) -> Result<()> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(anyhow!(e).context("starting a tokio runtime")));
            return Ok(());
        }
    };
    let observed = runtime.block_on(async move {
        // Observer::new registers the ring buffer with the runtime's epoll.
        let started = match Observer::new(config, snapshot) {
            Ok(started) => started,
            Err(e) => {
                let _ = ready.send(Err(e));
                return Ok(());
            }
        };
        let (observer, events, queries) = started;
        let _ = ready.send(Ok(queries));
        observer
            .run(events, async {
                let _ = shutdown.await;
            })
            .await
    });
    // The probes are detached by now. A census still running on a
    // blocking thread (a baseline of another process) is not waited for:
    // quitting `pymem top` should not wait for a heap copy to be parsed.
    runtime.shutdown_background();
    observed
}

fn not_root_hint() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        "cannot load the eBPF probes for the embedded observer".to_string()
    } else {
        "the embedded observer needs root to load eBPF probes: run `sudo pymem top`, or start `sudo pymem agent` and run `pymem top --agent URL`".to_string()
    }
}
