//! The observer: one task that owns the probes, follows processes, samples
//! the kernel counters into the model and publishes snapshots.
//!
//! kernel probes -> ring buffer / counters -> this loop -> `Snapshot` ->
//! exporters (metrics, JSON API, TUI).
//!
//! The loop drains the ring buffer between short steps; whatever reads
//! /proc or sleeps runs on blocking tasks that report back as `Found`.
//! - `lifecycle`: finding, observing and forgetting processes;
//! - `stacks`: Python stack layouts and symbolised allocation sites;
//! - `sampling`: the periodic sample into a `Snapshot`, and map sweeps;
//! - `oom`: post-mortems of processes the kernel kills for memory.
pub mod config;
mod inspect;
mod lifecycle;
mod oom;
mod sampling;
mod stacks;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{debug, info};
use pymem_common::{ProcStats, event_kind};
use tokio::sync::{mpsc, oneshot};

pub use self::config::ObserverConfig;
use crate::{
    bpf::{Probes, StatsReader, events::EventStream},
    census::{
        CensusFailure, CensusStage,
        stage::{CensusDone, CensusJob, CensusReply},
    },
    cpython::{Frame, Symbolizer},
    discover::{BinaryId, Discoverer, PythonProcess, Skip},
    k8s::{self, PodCache},
    limits::LimitReader,
    model::{Accounting, AgentInfo, HeapBaseline, HeapHistory, HeapOffsets, Snapshot},
    sites::{Site, SiteTracker},
};

pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

/// Questions for the observer that need its live state.
pub enum Query {
    /// Allocation sites of a process; `None` if it is not observed.
    Sites {
        pid: u32,
        reply: oneshot::Sender<Option<Vec<Site>>>,
    },
    /// An object census of a process no older than `max_age` (zero: a
    /// fresh one), answered when it is done.
    Census {
        pid: u32,
        max_age: Duration,
        reply: CensusReply,
    },
}

pub type QuerySender = mpsc::Sender<Query>;

/// How a process came to be inspected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FoundBy {
    /// Its exec event: observed from its first allocations.
    Exec,
    /// A fork (no exec): it runs its parent's image with the imports done,
    /// and holds its parent's heap.
    Fork,
    /// A scan of /proc: it ran before pymem found it.
    Scan,
}

/// Results of work done off the loop. Inspections carry the ticket of their
/// request, so that a result older than the pid's newest request is known
/// to be stale.
enum Found {
    Python {
        process: Box<PythonProcess>,
        found_by: FoundBy,
        ticket: u64,
    },
    Skipped(u32, Skip, u64),
    /// The full scan of this ticket finished; the set of pids seen in /proc.
    ScanDone(HashSet<u32>, u64),
    /// What a process's memory said of its stack layout.
    StackCheck(Box<stacks::LayoutChecked>),
    /// An object census finished.
    Census(Box<CensusDone>),
    /// The pace of background censuses allows the next one now.
    CensusDue,
}

struct Observed {
    /// Container and pod, for labels and the JSON API.
    attribution: k8s::Attribution,
    process: PythonProcess,
    /// When observation started; also tells this observation from a later
    /// one of the same pid.
    since: Instant,
    /// When per-allocation probes are due (start-up accounting until then).
    probes_due: Option<Instant>,
    /// Attaches of them that failed (retried up to `ATTACH_RETRIES`).
    attach_failures: u32,
    history: HeapHistory,
    accounting: Accounting,
    stats: ProcStats,
    last_hits: u64,
    hits_per_second: f64,
    last_sample: Instant,
    rss_bytes: u64,
    sites: SiteTracker,
    /// Reads code objects; None where stacks are unsupported.
    symbolizer: Option<Symbolizer>,
    /// The stack layout check while undecided (None: decided).
    stack_check: Option<stacks::PendingCheck>,
    /// Symbolised stacks by id (a stack id is a hash of code objects and
    /// instruction pointers, so it always means the same frames).
    frames: HashMap<u64, Vec<Frame>>,
    /// Set (and warned about once) when the arena size looks wrong.
    arena_size_mismatch: bool,
    /// Where `heap_bytes` starts from, and what a census found the process
    /// held before it was observed.
    baseline: HeapBaseline,
    offsets: HeapOffsets,
    /// When the baseline census is due (None: none wanted, or started).
    baseline_due: Option<Instant>,
    /// Whether the collector's probes count, on what, or why not.
    gc: GcStatus,
    /// Its memory cgroups at the last sample (a dying process's
    /// `/proc/PID/cgroup` may no longer name them).
    cgroups: Option<crate::limits::ProcessCgroups>,
}

/// The collector's probes of one process.
#[derive(Clone, Debug, Default)]
struct GcStatus {
    state: crate::model::GcState,
    source: Option<String>,
    reason: Option<String>,
}

pub struct Observer {
    config: ObserverConfig,
    probes: Probes,
    discoverer: Discoverer,
    observed: HashMap<u32, Observed>,
    /// Pids already inspected and found not to be Python (or unusable).
    skipped: HashSet<u32>,
    /// Binaries whose arena probes could not be attached (warned once;
    /// each new process of them tries again).
    failed_binaries: HashSet<BinaryId>,
    found_tx: mpsc::UnboundedSender<Found>,
    found_rx: mpsc::UnboundedReceiver<Found>,
    info: AgentInfo,
    exits_since_sweep: usize,
    snapshot: SharedSnapshot,
    /// This node's pods, when the Kubernetes API is watched.
    pods: Option<PodCache>,
    queries: mpsc::Receiver<Query>,
    /// Binaries whose missing stack support was already logged.
    stackless_binaries: HashSet<BinaryId>,
    /// Object censuses: requests, the running ones, the last two of each
    /// process.
    census: CensusStage,
    /// The per-process kernel counters, for censuses to read while their
    /// process is paused.
    stats_reader: StatsReader,
    /// Memory limits of the observed processes' cgroups, read each sample.
    limits: LimitReader,
    /// Inspections of processes that exec'd or forked.
    inspections: inspect::Inspections,
    /// The ticket of the next inspection or scan.
    next_ticket: u64,
    /// The newest inspection ticket of each pid whose result is still to
    /// come: older results of that pid are stale.
    newest_ticket: HashMap<u32, u64>,
}

impl Observer {
    pub fn new(
        config: ObserverConfig,
        snapshot: SharedSnapshot,
    ) -> Result<(Self, EventStream, QuerySender)> {
        let (probes, ring) = Probes::load(config.kernel())?;
        let events = EventStream::new(ring)?;
        let stats_reader = probes.stats_reader();
        let (found_tx, found_rx) = mpsc::unbounded_channel();
        let (query_tx, queries) = mpsc::channel(16);
        let discoverer = Discoverer::new(config.cmdline);
        let inspections = inspect::Inspections::start(discoverer.clone(), found_tx.clone());
        Ok((
            Self {
                config,
                probes,
                discoverer,
                observed: HashMap::new(),
                skipped: HashSet::new(),
                failed_binaries: HashSet::new(),
                found_tx,
                found_rx,
                info: AgentInfo::default(),
                exits_since_sweep: 0,
                snapshot,
                pods: None,
                queries,
                stackless_binaries: HashSet::new(),
                census: CensusStage::new(config.census),
                stats_reader,
                limits: LimitReader::new(),
                inspections,
                next_ticket: 1,
                newest_ticket: HashMap::new(),
            },
            events,
            query_tx,
        ))
    }

    /// Attributes processes in containers to their pods through `pods`.
    pub fn with_pods(mut self, pods: Option<PodCache>) -> Self {
        self.pods = pods;
        self
    }

    /// Runs until `shutdown` completes; dropping the observer detaches
    /// every probe.
    pub async fn run(
        mut self,
        mut events: EventStream,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        self.spawn_scan();
        let mut sample = tokio::time::interval(self.config.sample_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(self.config.rescan_interval);
        rescan.tick().await;
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        sweep.tick().await;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                batch = events.next_batch() => {
                    for event in batch? {
                        self.on_event(event);
                    }
                    self.info.malformed_records_total = events.malformed_records();
                }
                Some(found) = self.found_rx.recv() => self.on_found(found),
                Some(query) = self.queries.recv() => self.on_query(query),
                _ = sample.tick() => self.sample(),
                _ = rescan.tick() => self.spawn_scan(),
                _ = sweep.tick() => self.sweep(),
            }
        }
        info!("detaching probes from {} processes", self.observed.len());
        let started = std::time::Instant::now();
        self.probes.shutdown();
        info!("detached in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    fn on_event(&mut self, event: pymem_common::Event) {
        let pid = event.tgid;
        match event.kind {
            event_kind::EXEC => {
                // A tracked process that execs something else is a new image.
                if self.observed.contains_key(&pid) {
                    self.forget(pid);
                }
                self.skipped.remove(&pid);
                self.inspect(pid, FoundBy::Exec);
            }
            event_kind::FORK => self.inspect(pid, FoundBy::Fork),
            event_kind::EXIT => self.forget(pid),
            event_kind::BUDGET_EXCEEDED => self.over_budget(pid, event.size),
            event_kind::OOM_KILL => self.on_oom_kill(&event),
            event_kind::ARENA_ALLOC | event_kind::BLOCK_SAMPLE => {
                if let Some(observed) = self.observed.get_mut(&pid) {
                    observed
                        .sites
                        .allocated(event.addr, event.stack_id, event.size);
                }
            }
            event_kind::ARENA_FREE | event_kind::BLOCK_SAMPLE_FREE => {
                if let Some(observed) = self.observed.get_mut(&pid) {
                    observed.sites.freed(event.addr);
                }
            }
            event_kind::HEAP_SHRINK => {
                if let Some(observed) = self.observed.get_mut(&pid) {
                    let end = event.addr.saturating_add(event.size);
                    observed.sites.freed_range(event.addr, end);
                }
            }
            other => debug!("unknown event kind {other}"),
        }
    }

    fn on_found(&mut self, found: Found) {
        match found {
            Found::Python {
                process,
                found_by,
                ticket,
            } => {
                if self.is_current(process.pid, ticket) {
                    self.observe(*process, found_by);
                }
            }
            Found::Skipped(pid, skip, ticket) => {
                if self.is_current(pid, ticket) {
                    self.on_skipped(pid, skip);
                }
            }
            Found::ScanDone(pids, ticket) => self.on_scan_done(&pids, ticket),
            Found::StackCheck(checked) => self.on_layout_checked(*checked),
            Found::Census(done) => {
                self.rebase(&done);
                let next = self.census.finished(*done);
                self.spawn_census(next);
            }
            Found::CensusDue => {
                let next = self.census.woken();
                self.spawn_census(next);
            }
        }
    }

    fn on_query(&mut self, query: Query) {
        match query {
            Query::Sites { pid, reply } => {
                let _ = reply.send(self.sites(pid));
            }
            Query::Census {
                pid,
                max_age,
                reply,
            } => {
                let Some(observed) = self.observed.get(&pid) else {
                    let _ = reply.send(Err(CensusFailure::NotObserved));
                    return;
                };
                let binary = observed.process.binary.clone();
                let job = self.census.request(pid, &binary, max_age, reply);
                self.spawn_census(job);
            }
        }
    }

    /// Runs a census on a blocking thread (it pauses the process and copies
    /// its heap): never on this loop. Without one to run, wakes the loop
    /// when the next background census is due.
    fn spawn_census(&mut self, job: Option<CensusJob>) {
        let Some(job) = job else {
            if let Some(at) = self.census.take_wakeup() {
                let tx = self.found_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let _ = tx.send(Found::CensusDue);
                });
            }
            return;
        };
        let tx = self.found_tx.clone();
        let stats = self.stats_reader.clone();
        tokio::task::spawn_blocking(move || {
            // No entry yet: nothing counted yet.
            let done = job.run(move |pid| stats.read(pid).unwrap_or_default());
            let _ = tx.send(Found::Census(Box::new(done)));
        });
    }

    /// The processes whose `deadline` (a field of theirs) has come, with
    /// that field cleared.
    fn take_due(
        &mut self,
        now: Instant,
        deadline: fn(&mut Observed) -> &mut Option<Instant>,
    ) -> Vec<u32> {
        let mut due = Vec::new();
        for (&pid, observed) in self.observed.iter_mut() {
            let at = deadline(observed);
            if at.is_some_and(|at| at <= now) {
                *at = None;
                due.push(pid);
            }
        }
        due
    }

    /// Starts the baseline censuses that are due.
    fn baseline_due(&mut self, now: Instant) {
        for pid in self.take_due(now, |o| &mut o.baseline_due) {
            let observed = self.observed.get_mut(&pid).expect("due pid is observed");
            let binary = observed.process.binary.clone();
            let job = self.census.baseline(pid, &binary);
            self.spawn_census(job);
        }
    }

    /// A census of a process older than its observation says what it held
    /// before: from now on its heap is the counters plus that. Every later
    /// census measures it anew (the frees of memory older than the
    /// observation are not seen by the probes).
    fn rebase(&mut self, done: &CensusDone) {
        let (Ok(census), Some(counters)) = (&done.result, &done.counters_at_copy) else {
            return;
        };
        let Some(observed) = self.observed.get_mut(&done.pid) else {
            return;
        };
        if observed.baseline == HeapBaseline::Observed || observed.since > done.started {
            return;
        }
        observed.offsets = HeapOffsets::from_census(
            census.heap.arena_bytes,
            census.heap.outside_pymalloc_bytes,
            counters,
        );
        if observed.baseline != HeapBaseline::Census {
            info!(
                "pid {}: heap baseline from a census: {} arena bytes and {} bytes outside pymalloc held before it was observed",
                done.pid, census.heap.arena_bytes, observed.offsets.before_attach_bytes
            );
        }
        observed.baseline = HeapBaseline::Census;
    }
}
