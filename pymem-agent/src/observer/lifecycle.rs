//! Process lifecycle: finding Python processes (scans, exec and fork
//! events), observing them, attaching their per-allocation probes once past
//! start-up, moving them to syscall accounting over budget, forgetting them.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use procfs::Current as _;
use pymem_common::ProcStats;

use super::{Found, FoundBy, GcStatus, Observed, Observer, stacks::PendingCheck};
use crate::{
    bpf::GcAttach,
    discover::{self, PythonProcess, Skip},
    k8s,
    model::{Accounting, GcState, HeapBaseline, HeapHistory, HeapOffsets},
    sites::SiteTracker,
};

impl Observer {
    pub(super) fn over_budget(&mut self, pid: u32, hits: u64) {
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
                if observed.gc.state == GcState::Counting {
                    observed.gc.state = GcState::Stopped;
                    observed.gc.reason = Some(
                        "detached with the per-allocation probes: the process went over its probe budget"
                            .into(),
                    );
                }
                self.info.budget_switches_total += 1;
                info!(
                    "pid {pid} ({}): over its allocation-probe budget ({} hits/s, burst {} from a first {}) after {hits} hits; now accounting memory outside pymalloc by brk/mmap syscalls",
                    observed.process.comm,
                    self.config.hit_budget_per_sec,
                    self.config.hit_budget_burst,
                    self.config
                        .hit_budget_first_burst
                        .min(self.config.hit_budget_burst)
                );
            }
            Err(e) => warn!("pid {pid}: switching to syscall accounting failed: {e:#}"),
        }
    }

    pub(super) fn forget(&mut self, pid: u32) {
        if self.observed.remove(&pid).is_some() {
            // Not served until the next sample: after an exec the process
            // is something else already.
            self.snapshot
                .write()
                .expect("snapshot lock")
                .processes
                .retain(|p| p.pid != pid);
            self.census.forget(pid);
            self.probes.forget_process(pid);
            self.exits_since_sweep += 1;
            debug!("pid {pid} exited");
        }
    }

    /// Queues an inspection of `pid`; results of earlier requests of it
    /// are stale from now on.
    pub(super) fn inspect(&mut self, pid: u32, found_by: FoundBy) {
        let ticket = self.take_ticket();
        self.newest_ticket.insert(pid, ticket);
        if !self.inspections.request(pid, found_by, ticket) {
            debug!("pid {pid}: inspection queue full; the next scan looks at it");
        }
    }

    fn take_ticket(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        ticket
    }

    /// Whether a result of `pid` with `ticket` is its newest: a fork
    /// inspected before the exec that followed it, or a scan that read a
    /// pid before it was reused, is not.
    pub(super) fn is_current(&mut self, pid: u32, ticket: u64) -> bool {
        match self.newest_ticket.get(&pid) {
            Some(&newest) if newest > ticket => {
                debug!("pid {pid}: dropping a stale inspection (ticket {ticket} < {newest})");
                false
            }
            Some(&newest) => {
                if newest == ticket {
                    self.newest_ticket.remove(&pid);
                }
                true
            }
            None => true,
        }
    }

    /// Scans /proc for processes not yet known.
    pub(super) fn spawn_scan(&mut self) {
        let ticket = self.take_ticket();
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
                        found_by: FoundBy::Scan,
                        ticket,
                    },
                    Err(skip) => Found::Skipped(pid, skip, ticket),
                };
                if tx.send(found).is_err() {
                    return;
                }
            }
            let _ = tx.send(Found::ScanDone(pids, ticket));
        });
    }

    pub(super) fn on_skipped(&mut self, pid: u32, skip: Skip) {
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

    pub(super) fn on_scan_done(&mut self, pids: &HashSet<u32>, ticket: u64) {
        self.skipped.retain(|pid| pids.contains(pid));
        // A request older than this scan whose result never came (dropped
        // from a full queue) was answered by the scan.
        self.newest_ticket.retain(|_, newest| *newest > ticket);
        // The scan's pid list is older than processes observed since (exec
        // events): ask procfs, not the list.
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

    pub(super) fn observe(&mut self, process: PythonProcess, found_by: FoundBy) {
        let forked = found_by == FoundBy::Fork;
        let pid = process.pid;
        if let Some(observed) = self.observed.get(&pid) {
            if observed.process.start_ticks == process.start_ticks {
                return;
            }
            // The observed one exited unseen and its pid was reused.
            self.forget(pid);
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
        // Workers a pre-fork server forked before it was tracked (it was
        // found while starting, or before the agent) sent no fork event.
        for child in discover::children(pid) {
            if !self.observed.contains_key(&child) {
                self.inspect(child, FoundBy::Fork);
            }
        }
        let now = Instant::now();
        self.spawn_stack_check(&process, now, now);
        // A forked child has no imports ahead of it, and it inherits its
        // parent's breakpoints, which cost it a trap each, uncounted, until
        // its own probes are attached: attach them at once.
        let age = process_age(pid).unwrap_or(Duration::MAX);
        let probes_due = if forked {
            now
        } else {
            now + self.config.probe_delay.saturating_sub(age)
        };
        // A process that ran before it was found (or a forked child, which
        // holds its parent's heap) allocated what the counters will never
        // see: a census measures it. A forked child is given a moment, as
        // most exec something else at once.
        let older = found_by != FoundBy::Exec;
        let baseline = if older {
            HeapBaseline::SinceAttach
        } else {
            HeapBaseline::Observed
        };
        let baseline_due = (older && self.config.census.baseline).then(|| {
            now + if forked {
                FORK_BASELINE_DELAY
            } else {
                Duration::ZERO
            }
        });
        self.observed.insert(
            pid,
            Observed {
                attribution: k8s::Attribution::of_process(pid),
                process,
                since: now,
                probes_due: Some(probes_due),
                attach_failures: 0,
                history: HeapHistory::default(),
                accounting: Accounting::Startup,
                stats: ProcStats::default(),
                last_hits: 0,
                hits_per_second: 0.0,
                last_sample: now,
                rss_bytes: 0,
                sites: SiteTracker::default(),
                symbolizer: None,
                stack_check: Some(PendingCheck::first(now)),
                frames: HashMap::new(),
                arena_size_mismatch: false,
                baseline,
                offsets: HeapOffsets::default(),
                baseline_due,
                gc: GcStatus::default(),
                cgroups: self.limits.cgroups_of(pid),
            },
        );
    }

    fn attach_failed(&mut self, pid: u32, comm: &str, e: anyhow::Error) {
        // A zombie still has its /proc entry, but nothing to attach to.
        if discover::is_running(pid) {
            self.info.attach_errors_total += 1;
            warn!("pid {pid} ({comm}): attaching failed: {e:#}");
        } else {
            debug!("pid {pid} exited during attach: {e:#}");
        }
    }

    /// Attaches per-allocation probes to processes past their start-up.
    pub(super) fn attach_due(&mut self, now: Instant) {
        for pid in self.take_due(now, |o| &mut o.probes_due) {
            let observed = self.observed.get_mut(&pid).expect("due pid is observed");
            let binary = observed.process.binary.clone();
            match self.probes.attach_process(pid, &binary) {
                Ok(gc) => {
                    observed.accounting = Accounting::Probes;
                    observed.gc = match gc {
                        GcAttach::Attached(source) => GcStatus {
                            state: GcState::Counting,
                            source: Some(source),
                            reason: None,
                        },
                        GcAttach::Unavailable(why) => {
                            debug!("pid {pid}: garbage collections not counted: {why}");
                            GcStatus {
                                state: GcState::Unavailable,
                                source: None,
                                reason: Some(why),
                            }
                        }
                    };
                }
                Err(e) => {
                    // A mapping that changed since the process was
                    // inspected (`/proc/PID/map_files/<range>` gone) fails
                    // once; the next attempt opens the file by its maps now.
                    observed.attach_failures += 1;
                    let reopened = discover::current_open_path(pid, &observed.process.binary);
                    let retry = observed.attach_failures <= ATTACH_RETRIES
                        && discover::is_running(pid)
                        && reopened.is_some();
                    let comm = observed.process.comm.clone();
                    if let Some(path) = reopened.filter(|_| retry) {
                        observed.process.binary.open_path = path;
                        observed.probes_due = Some(now + ATTACH_RETRY_AFTER);
                        debug!("pid {pid} ({comm}): attaching failed, retrying: {e:#}");
                    } else {
                        self.attach_failed(pid, &comm, e);
                    }
                }
            }
        }
    }
}

/// Attempts after a failed attach of a process's per-allocation probes,
/// and the wait before each.
const ATTACH_RETRIES: u32 = 3;
const ATTACH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a forked child runs before its baseline census: most forks
/// exec another program within it.
const FORK_BASELINE_DELAY: Duration = Duration::from_secs(1);

/// Time since the process started, from its start time in procfs.
fn process_age(pid: u32) -> Option<Duration> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let started = stat.starttime as f64 / procfs::ticks_per_second() as f64;
    let uptime = procfs::Uptime::current().ok()?.uptime;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}
