//! The observer: one task that owns the probes, follows processes, samples
//! the kernel counters into the model and publishes snapshots.
//!
//! kernel probes -> ring buffer / counters -> this loop -> `Snapshot` ->
//! exporters (metrics, JSON API, TUI).
pub mod config;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{debug, info, warn};
use pymem_common::{ProcStats, event_kind};
use tokio::sync::{mpsc, oneshot};

use crate::{
    bpf::{KernelConfig, Probes, events::EventStream},
    cpython::{
        self, Frame, Symbolizer, arena,
        layout_check::{self, Verdict},
    },
    discover::{self, BinaryId, Discoverer, PythonProcess, Skip},
    k8s::{self, PodCache},
    model::{
        Accounting, AgentInfo, HeapBreakdown, HeapHistory, LeakPolicy, ProcessInfo, Snapshot,
        SourceTotals,
    },
    sites::{self, Site, SiteTracker},
};

#[derive(Clone, Copy, Debug)]
pub struct ObserverConfig {
    pub sample_interval: Duration,
    pub policy: LeakPolicy,
    /// Budgeted probe hits per process per second before it is moved to
    /// syscall accounting; 0 = never.
    pub hit_budget_per_sec: u64,
    /// Hits a process may spend at once (start-up imports) on top of the rate.
    pub hit_budget_burst: u64,
    /// Full /proc rescans, a safety net behind exec/fork events.
    pub rescan_interval: Duration,
    /// Heap history kept per process (for the UI).
    pub history: Duration,
    /// Process age before per-allocation probes are attached: start-up
    /// imports allocate in bursts that would cost more than they tell.
    pub probe_delay: Duration,
    /// Mean bytes between stack samples of blocks outside pymalloc; 0 = off.
    pub sample_bytes: u64,
    /// Size of the kernel's event ring buffer.
    pub ring_buffer_bytes: u32,
    /// Top sites per process published with each snapshot (for per-site
    /// metrics); 0 = none.
    pub site_metrics: usize,
    /// Per-process probes as perf-event uprobes even where multi-uprobe
    /// links work.
    pub perf_uprobes: bool,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            sample_interval: Duration::from_secs(1),
            policy: LeakPolicy::default(),
            hit_budget_per_sec: 1000,
            hit_budget_burst: 500,
            rescan_interval: Duration::from_secs(10),
            history: Duration::from_secs(300),
            probe_delay: Duration::from_secs(5),
            sample_bytes: 256 << 10,
            ring_buffer_bytes: 1 << 20,
            site_metrics: 0,
            perf_uprobes: false,
        }
    }
}

pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

/// Questions for the observer that need its live state.
pub enum Query {
    /// Allocation sites of a process; `None` if it is not observed.
    Sites {
        pid: u32,
        reply: oneshot::Sender<Option<Vec<Site>>>,
    },
}

pub type QuerySender = mpsc::Sender<Query>;

/// Results of discovery work done off the loop.
enum Found {
    /// `forked`: found through a fork (no exec), so it runs its parent's
    /// image with the imports done.
    Python {
        process: Box<PythonProcess>,
        forked: bool,
    },
    Skipped(u32, Skip),
    /// The full scan finished; the set of pids seen in /proc.
    ScanDone(HashSet<u32>),
}

struct Observed {
    /// Container and pod, for labels and the JSON API.
    attribution: k8s::Attribution,
    process: PythonProcess,
    since: Instant,
    /// When per-allocation probes are due (start-up accounting until then).
    probes_due: Option<Instant>,
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
    /// Until when to keep trying to verify the stack layout against the
    /// process's memory (None: decided).
    stack_check_until: Option<Instant>,
    /// Symbolised stacks by id (a stack id is a hash of code objects and
    /// instruction pointers, so it always means the same frames).
    frames: HashMap<u64, Vec<Frame>>,
    /// Set (and warned about once) when the arena size looks wrong.
    arena_size_mismatch: bool,
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
}

impl Observer {
    pub fn new(
        config: ObserverConfig,
        snapshot: SharedSnapshot,
    ) -> Result<(Self, EventStream, QuerySender)> {
        let (probes, ring) = Probes::load(KernelConfig {
            hit_budget_per_sec: config.hit_budget_per_sec,
            hit_budget_burst: config.hit_budget_burst,
            ring_buffer_bytes: config.ring_buffer_bytes,
            perf_uprobes: config.perf_uprobes,
        })?;
        let events = EventStream::new(ring)?;
        let (found_tx, found_rx) = mpsc::unbounded_channel();
        let (query_tx, queries) = mpsc::channel(16);
        Ok((
            Self {
                config,
                probes,
                discoverer: Discoverer::default(),
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
                self.spawn_inspect(pid, true);
            }
            event_kind::FORK => self.spawn_inspect(pid, false),
            event_kind::EXIT => self.forget(pid),
            event_kind::BUDGET_EXCEEDED => self.over_budget(pid, event.size),
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

    fn over_budget(&mut self, pid: u32, hits: u64) {
        let Some(observed) = self.observed.get_mut(&pid) else {
            return;
        };
        if observed.accounting != Accounting::Probes {
            return;
        }
        let arena_size = observed.process.binary.interpreter.version.arena_size();
        match self.probes.switch_to_syscalls(pid, arena_size) {
            Ok(()) => {
                observed.accounting = Accounting::Syscalls;
                self.info.budget_switches_total += 1;
                info!(
                    "pid {pid} ({}): over its allocation-probe budget ({} hits/s, burst {}) after {hits} hits; now accounting memory outside pymalloc by brk/mmap syscalls",
                    observed.process.comm,
                    self.config.hit_budget_per_sec,
                    self.config.hit_budget_burst
                );
            }
            Err(e) => warn!("pid {pid}: switching to syscall accounting failed: {e:#}"),
        }
    }

    fn forget(&mut self, pid: u32) {
        if self.observed.remove(&pid).is_some() {
            self.probes.forget_process(pid);
            self.exits_since_sweep += 1;
            debug!("pid {pid} exited");
        }
    }

    /// Inspects one process off the loop. Right after exec the loader may
    /// not have mapped libpython yet: retry for up to ~1 s.
    fn spawn_inspect(&self, pid: u32, after_exec: bool) {
        let discoverer = self.discoverer.clone();
        let tx = self.found_tx.clone();
        tokio::task::spawn_blocking(move || {
            if !after_exec && !discover::is_process(pid) {
                return; // a new thread, not a new process
            }
            // The dynamic loader maps libpython within milliseconds, or
            // seconds on a starved machine.
            let delays_ms = [0u64, 10, 20, 40, 80, 150, 250, 400, 500, 1000, 1000, 1500];
            let mut last = Skip::Gone;
            for delay in delays_ms {
                std::thread::sleep(Duration::from_millis(delay));
                match discoverer.inspect(pid) {
                    Ok(process) => {
                        let _ = tx.send(Found::Python {
                            process: Box::new(process),
                            forked: !after_exec,
                        });
                        return;
                    }
                    Err(Skip::NotYetMapped) => last = Skip::NotYetMapped,
                    Err(skip) => {
                        last = skip;
                        break;
                    }
                }
            }
            let _ = tx.send(Found::Skipped(pid, last));
        });
    }

    /// Scans /proc for processes not yet known.
    fn spawn_scan(&self) {
        let known: HashSet<u32> = self
            .observed
            .keys()
            .chain(self.skipped.iter())
            .copied()
            .collect();
        let discoverer = self.discoverer.clone();
        let tx = self.found_tx.clone();
        let me = std::process::id();
        tokio::task::spawn_blocking(move || {
            let pids: HashSet<u32> = discover::all_pids().into_iter().collect();
            for &pid in &pids {
                if pid == me || known.contains(&pid) {
                    continue;
                }
                let found = match discoverer.inspect(pid) {
                    Ok(process) => Found::Python {
                        process: Box::new(process),
                        forked: false,
                    },
                    Err(skip) => Found::Skipped(pid, skip),
                };
                if tx.send(found).is_err() {
                    return;
                }
            }
            let _ = tx.send(Found::ScanDone(pids));
        });
    }

    fn on_found(&mut self, found: Found) {
        match found {
            Found::Python { process, forked } => self.observe(*process, forked),
            Found::Skipped(pid, skip) => {
                match &skip {
                    Skip::Unsupported(reason) => {
                        self.info.skipped_processes_total += 1;
                        info!("pid {pid}: not observed: {reason}");
                    }
                    Skip::NotPython(reason) => debug!("pid {pid}: not Python: {reason}"),
                    Skip::NotYetMapped => debug!(
                        "pid {pid}: links libpython but has not mapped it yet; the next scan looks again"
                    ),
                    Skip::Gone => debug!("pid {pid}: exited before it could be inspected"),
                }
                if !matches!(skip, Skip::Gone | Skip::NotYetMapped) {
                    self.skipped.insert(pid);
                }
            }
            Found::ScanDone(pids) => {
                self.skipped.retain(|pid| pids.contains(pid));
                // The scan's pid list is older than processes observed since
                // (exec events): ask procfs, not the list.
                let gone: Vec<u32> = self
                    .observed
                    .keys()
                    .filter(|pid| !pids.contains(pid) && !discover::is_process(**pid))
                    .copied()
                    .collect();
                for pid in gone {
                    self.forget(pid);
                }
            }
        }
    }

    fn observe(&mut self, process: PythonProcess, forked: bool) {
        let pid = process.pid;
        if self.observed.contains_key(&pid) {
            return;
        }
        let interp = &process.binary.interpreter;
        if interp.free_threaded {
            self.skipped.insert(pid);
            self.info.skipped_processes_total += 1;
            info!(
                "pid {pid} ({}): free-threaded Python {} uses mimalloc, not pymalloc arenas; not supported yet",
                process.comm, interp.version
            );
            return;
        }
        if let Err(e) = self.probes.ensure_binary(&process.binary) {
            // The binary is opened through this process's /proc entry,
            // which vanishes when the process exits (zombies included):
            // then nothing is wrong with the binary, the next process of it
            // simply tries again.
            if !discover::is_running(pid) {
                debug!("pid {pid} exited while its binary was attached: {e:#}");
                return;
            }
            if self.failed_binaries.insert(process.binary.id) {
                warn!("{e:#}; processes running it are not observed");
            }
            self.info.attach_errors_total += 1;
            self.skipped.insert(pid);
            return;
        }
        if let Err(e) = self.probes.track(pid, interp.version.arena_size()) {
            self.attach_failed(pid, &process.comm, e);
            return;
        }
        info!(
            "observing pid {pid} ({}) Python {} from {}",
            process.comm, interp.version, process.binary.display_path
        );
        let now = Instant::now();
        let (symbolizer, stack_check_until) = match self.enable_stacks(&process) {
            StackSetup::On(symbolizer) => (Some(symbolizer), None),
            StackSetup::NotYet(_) => (None, Some(now + STACK_CHECK_PATIENCE)),
            StackSetup::Off => (None, None),
        };
        // A forked child has no imports ahead of it, and it inherits its
        // parent's breakpoints, which cost it a trap each, uncounted, until
        // its own probes are attached: attach them at once.
        let probes_due = if forked {
            now
        } else {
            let age = process_age(pid).unwrap_or(Duration::MAX);
            now + self.config.probe_delay.saturating_sub(age)
        };
        self.observed.insert(
            pid,
            Observed {
                attribution: k8s::Attribution::of_process(pid),
                process,
                since: now,
                probes_due: Some(probes_due),
                history: HeapHistory::default(),
                accounting: Accounting::Startup,
                stats: ProcStats::default(),
                last_hits: 0,
                hits_per_second: 0.0,
                last_sample: now,
                rss_bytes: 0,
                sites: SiteTracker::default(),
                symbolizer,
                stack_check_until,
                frames: HashMap::new(),
                arena_size_mismatch: false,
            },
        );
    }

    /// Gives the kernel the process's stack layout once the process's
    /// memory confirms it (a wrong layout would give garbage stacks); logs
    /// once per binary where stacks are not supported.
    fn enable_stacks(&mut self, process: &PythonProcess) -> StackSetup {
        let pid = process.pid;
        let layout = cpython::layout_for(pid, &process.binary, self.config.sample_bytes);
        if let Ok(layout) = &layout {
            match layout_check::check(pid, process.binary.interpreter.version, layout) {
                Verdict::Verified(what) => debug!("pid {pid}: stack layout verified: {what}"),
                Verdict::Unchecked => {}
                Verdict::NotYet(why) => return StackSetup::NotYet(why),
                Verdict::Wrong(why) => {
                    warn!(
                        "pid {pid} ({}): Python stacks disabled: the Python {} stack layout does not fit this process: {why}",
                        process.comm, process.binary.interpreter.version
                    );
                    return StackSetup::Off;
                }
            }
        }
        let result = layout.and_then(|layout| {
            let symbolizer = Symbolizer::new(pid, layout.code)?;
            self.probes.set_layout(pid, layout.kernel)?;
            Ok(symbolizer)
        });
        match result {
            Ok(symbolizer) => StackSetup::On(symbolizer),
            Err(e) => {
                if self.stackless_binaries.insert(process.binary.id) {
                    info!(
                        "{}: no allocation sites: {e:#}",
                        process.binary.display_path
                    );
                }
                StackSetup::Off
            }
        }
    }

    /// Tries again to verify the stack layouts of processes that were not
    /// far enough (just started) when first seen.
    fn retry_stack_checks(&mut self, now: Instant) {
        let pending: Vec<u32> = self
            .observed
            .iter()
            .filter(|(_, o)| o.stack_check_until.is_some())
            .map(|(&pid, _)| pid)
            .collect();
        for pid in pending {
            let process = self.observed[&pid].process.clone();
            let setup = self.enable_stacks(&process);
            let observed = self
                .observed
                .get_mut(&pid)
                .expect("pending pid is observed");
            match setup {
                StackSetup::On(symbolizer) => {
                    observed.symbolizer = Some(symbolizer);
                    observed.stack_check_until = None;
                }
                StackSetup::NotYet(why) if observed.stack_check_until.is_some_and(|t| now >= t) => {
                    info!(
                        "pid {pid} ({}): Python stacks stay off: the stack layout could not be verified within {}s: {why}",
                        process.comm,
                        STACK_CHECK_PATIENCE.as_secs()
                    );
                    observed.stack_check_until = None;
                }
                StackSetup::NotYet(_) => {}
                StackSetup::Off => observed.stack_check_until = None,
            }
        }
    }

    fn on_query(&mut self, query: Query) {
        match query {
            Query::Sites { pid, reply } => {
                let _ = reply.send(self.sites(pid));
            }
        }
    }

    /// Symbolises the stacks of a process's live attribution.
    fn sites(&mut self, pid: u32) -> Option<Vec<Site>> {
        let observed = self.observed.get_mut(&pid)?;
        let mut stacks = Vec::new();
        for (stack_id, bytes) in observed.sites.stacks() {
            let frames = match observed.frames.get(&stack_id) {
                Some(frames) => frames.clone(),
                None => {
                    let frames = match (&mut observed.symbolizer, self.probes.stack(stack_id)) {
                        (Some(symbolizer), Some(raw)) => symbolizer.stack(&raw),
                        _ => vec![Frame {
                            function: "<no Python stack>".into(),
                            file: String::new(),
                            line: 0,
                        }],
                    };
                    observed.frames.insert(stack_id, frames.clone());
                    frames
                }
            };
            stacks.push((frames, bytes));
        }
        Some(sites::group_sites(stacks))
    }

    /// Each process's `site_metrics` heaviest sites that hold memory. Cheap
    /// after the first time: symbolised stacks are cached per stack id.
    fn top_sites(&mut self) -> BTreeMap<u32, Vec<Site>> {
        let limit = self.config.site_metrics;
        if limit == 0 {
            return BTreeMap::new();
        }
        let pids: Vec<u32> = self.observed.keys().copied().collect();
        pids.into_iter()
            .filter_map(|pid| {
                let mut sites = self.sites(pid)?;
                sites.retain(|site| site.bytes > 0);
                sites.truncate(limit);
                // Metrics need no stacks; snapshots are cloned per request.
                sites.iter_mut().for_each(|site| site.stack.clear());
                Some((pid, sites))
            })
            .collect()
    }

    fn attach_failed(&mut self, pid: u32, comm: &str, e: anyhow::Error) {
        if discover::is_process(pid) {
            self.info.attach_errors_total += 1;
            warn!("pid {pid} ({comm}): attaching failed: {e:#}");
        } else {
            debug!("pid {pid} exited during attach: {e:#}");
        }
    }

    /// Attaches per-allocation probes to processes past their start-up.
    fn attach_due(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .observed
            .iter()
            .filter(|(_, o)| o.probes_due.is_some_and(|at| at <= now))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in due {
            let observed = self.observed.get_mut(&pid).expect("due pid is observed");
            observed.probes_due = None;
            let binary = observed.process.binary.clone();
            match self.probes.attach_process(pid, &binary) {
                Ok(()) => observed.accounting = Accounting::Probes,
                Err(e) => {
                    let comm = observed.process.comm.clone();
                    self.attach_failed(pid, &comm, e);
                }
            }
        }
    }

    fn sample(&mut self) {
        let now = Instant::now();
        self.attach_due(now);
        self.retry_stack_checks(now);
        let page_size = procfs::page_size();
        let retain = self.config.history.as_secs_f64();
        let mut processes = Vec::with_capacity(self.observed.len());
        let mut gone = Vec::new();
        for (&pid, observed) in self.observed.iter_mut() {
            let Ok(statm) = procfs::process::Process::new(pid as i32).and_then(|p| p.statm())
            else {
                gone.push(pid);
                continue;
            };
            observed.rss_bytes = statm.resident * page_size;
            observed.attribution.resolve(self.pods.as_ref());
            let stats = self.probes.process_stats(pid).unwrap_or_default();
            let dt = now.duration_since(observed.last_sample).as_secs_f64();
            if dt > 0.0 {
                observed.hits_per_second =
                    stats.probe_hits.saturating_sub(observed.last_hits) as f64 / dt;
            }
            observed.last_hits = stats.probe_hits;
            observed.last_sample = now;
            observed.stats = stats;
            check_arena_size(pid, observed);
            let heap = HeapBreakdown::from_stats(&stats);
            let t = now.duration_since(observed.since).as_secs_f64();
            observed.history.push(t, heap.total(), retain);
            processes.push(process_info(observed, heap, t, &self.config.policy));
        }
        for pid in gone {
            self.forget(pid);
        }
        processes.sort_by_key(|p| p.pid);
        self.info.events_lost_total = self.probes.events_lost();
        self.info.live_map_full_total = self.probes.live_map_full();
        self.info.attached_binaries = self.probes.attached_binaries();
        self.info.probe_links = self.probes.probe_links();
        let snapshot = Snapshot {
            processes,
            agent: self.info.clone(),
            top_sites: self.top_sites(),
        };
        *self.snapshot.write().expect("snapshot lock") = snapshot;
    }

    fn sweep(&mut self) {
        if self.exits_since_sweep == 0 {
            return;
        }
        self.exits_since_sweep = 0;
        let alive: HashSet<u32> = self.observed.keys().copied().collect();
        self.probes.sweep(|pid| alive.contains(&pid));
        let binaries: HashSet<BinaryId> = self
            .observed
            .values()
            .map(|o| o.process.binary.id)
            .collect();
        self.probes.retain_binaries(|id| binaries.contains(id));
        self.discoverer.retain(|id| binaries.contains(id));
    }
}

/// How long a new process may take to show a verifiable Python stack
/// (initialised interpreter, a thread in Python code).
const STACK_CHECK_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a process gets Python stacks.
enum StackSetup {
    On(Symbolizer),
    /// The layout cannot be verified yet (the reason); try again.
    NotYet(String),
    Off,
}

/// Time since the process started, from its start time in procfs.
fn process_age(pid: u32) -> Option<Duration> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let started = stat.starttime as f64 / procfs::ticks_per_second() as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}

fn process_info(o: &Observed, heap: HeapBreakdown, t: f64, policy: &LeakPolicy) -> ProcessInfo {
    let trend = o.history.trend(policy.window.as_secs_f64());
    let allocated = SourceTotals::allocated(&o.stats);
    let freed = SourceTotals::freed(&o.stats);
    ProcessInfo {
        pid: o.process.pid,
        ns_pid: o.process.ns_pid,
        comm: o.process.comm.clone(),
        cmdline: o.process.cmdline.clone(),
        python_version: o.process.binary.interpreter.version.to_string(),
        binary: o.process.binary.display_path.clone(),
        heap_bytes: heap.total(),
        heap,
        growth_bytes_per_second: trend.slope,
        rss_bytes: o.rss_bytes,
        leak_suspected: trend.is_leak(policy),
        allocated_bytes_total: allocated.total(),
        freed_bytes_total: freed.total(),
        allocated_bytes_by_source: allocated,
        freed_bytes_by_source: freed,
        accounting: o.accounting,
        probe_hits_per_second: o.hits_per_second,
        probe_hits_total: o.stats.probe_hits,
        observed_seconds: t,
        heap_history: o
            .history
            .points()
            .map(|(at, bytes)| (t - at, bytes as u64))
            .collect(),
        container_info: o.attribution.info(),
        arena_size_mismatch: o.arena_size_mismatch,
    }
}

/// Marks a process whose arenas are not the size its version implies, and
/// says so once: its heap would otherwise be silently wrong.
fn check_arena_size(pid: u32, observed: &mut Observed) {
    if observed.arena_size_mismatch {
        return;
    }
    let expected = observed.process.binary.interpreter.version.arena_size();
    if let Some(mismatch) = arena::arena_size_mismatch(&observed.stats, expected) {
        observed.arena_size_mismatch = true;
        warn!(
            "pid {pid} ({}): arena size mismatch: {mismatch}; Python {} from {} does not use the arena size of its version, so its heap misses pymalloc arenas (arena_size_mismatch in the API)",
            observed.process.comm,
            observed.process.binary.interpreter.version,
            observed.process.binary.display_path
        );
    }
}
