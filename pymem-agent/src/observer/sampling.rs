//! The periodic sample: kernel counters and /proc into each process's
//! model, published as a `Snapshot`; and the sweep of what exited processes
//! left in the kernel maps.
use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use log::{info, warn};

use super::{Observed, Observer};
use crate::{
    census::TypeStats,
    cpython::arena,
    discover::BinaryId,
    limits::MemoryLimit,
    model::{GcInfo, HeapBreakdown, LeakPolicy, ProcessInfo, Snapshot, SourceTotals},
};

impl Observer {
    pub(super) fn sample(&mut self) {
        let now = Instant::now();
        self.attach_due(now);
        self.baseline_due(now);
        self.retry_stack_checks(now);
        let page_size = procfs::page_size();
        let retain = self.config.history.as_secs_f64();
        let mut processes = Vec::with_capacity(self.observed.len());
        let mut gone = Vec::new();
        let mut reused = Vec::new();
        let mut automatic = Vec::new();
        self.limits.start_tick();
        for (&pid, observed) in self.observed.iter_mut() {
            let Ok((stat, statm)) =
                procfs::process::Process::new(pid as i32).and_then(|p| Ok((p.stat()?, p.statm()?)))
            else {
                gone.push(pid);
                continue;
            };
            // Its exit was missed (events lost) and the pid taken since.
            if stat.starttime != observed.process.start_ticks {
                reused.push(pid);
                continue;
            }
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
            let heap = HeapBreakdown::from_stats(&stats, &observed.offsets);
            let t = now.duration_since(observed.since).as_secs_f64();
            observed.history.push(t, heap.total(), retain);
            // Read each tick, as statm is: a process can be moved to
            // another cgroup, and limits and usage change.
            let cgroups = self.limits.cgroups_of(pid);
            let limit = cgroups
                .as_ref()
                .and_then(|cgroups| self.limits.of_cgroups(cgroups));
            if cgroups.is_some() {
                observed.cgroups = cgroups;
            }
            let mut info = process_info(observed, heap, t, &self.config.policy, limit);
            info.census_unsupported = self.census.unsupported(pid).map(str::to_owned);
            if info.leak_suspected {
                automatic.push((pid, observed.process.binary.clone()));
            }
            processes.push(info);
        }
        for (pid, binary) in automatic {
            let job = self.census.maybe_automatic(pid, &binary);
            self.spawn_census(job);
        }
        for pid in gone {
            self.forget(pid);
        }
        for pid in reused {
            info!("pid {pid}: now another process (its start time changed); inspecting it anew");
            self.forget(pid);
            self.inspect(pid, super::FoundBy::Scan);
        }
        processes.sort_by_key(|p| p.pid);
        self.info.events_lost_total = self.probes.events_lost();
        self.info.inspections_dropped_total = self.inspections.dropped();
        self.info.inspections_pending = self.inspections.pending();
        self.info.censuses_queued = self.census.queued();
        self.info.kernel_map_entries = self
            .probes
            .map_entries()
            .into_iter()
            .map(|(map, entries)| (map.to_owned(), entries as u64))
            .collect();
        self.info.live_map_full_total = self.probes.live_map_full();
        let kernel_errors: BTreeMap<String, u64> = self
            .probes
            .kernel_errors()
            .into_iter()
            .map(|(map, errors)| (map.to_owned(), errors))
            .collect();
        for (map, errors) in &kernel_errors {
            let before = self.info.kernel_errors_total.get(map).copied().unwrap_or(0);
            if *errors > before {
                warn!(
                    "kernel side: {} insertions into {map} failed since the last sample (map full); pymem_kernel_errors_total counts them",
                    errors - before
                );
            }
        }
        self.info.kernel_errors_total = kernel_errors;
        self.info.attached_binaries = self.probes.attached_binaries();
        self.info.probe_links = self.probes.probe_links();
        self.symbolise_live_stacks();
        let top_sites = self.top_sites();
        let top_types = self.top_types();
        let mut published = self.snapshot.write().expect("snapshot lock");
        // Post-mortems outlive their processes: they move on to each new
        // snapshot.
        let oom_kills = std::mem::take(&mut published.oom_kills);
        *published = Snapshot {
            processes,
            agent: self.info.clone(),
            top_sites,
            top_types,
            oom_kills,
        };
    }

    /// Each process's heaviest types in its latest census, for
    /// `--type-metrics N`.
    fn top_types(&self) -> BTreeMap<u32, Vec<TypeStats>> {
        let n = self.config.census.type_metrics;
        if n == 0 {
            return BTreeMap::new();
        }
        self.observed
            .keys()
            .filter_map(|&pid| {
                let census = self.census.latest(pid)?;
                Some((pid, census.heap.types.iter().take(n).cloned().collect()))
            })
            .collect()
    }

    pub(super) fn sweep(&mut self) {
        let mut stacks_in_use = HashSet::new();
        for observed in self.observed.values_mut() {
            for stack_id in observed.sites.prune(DEAD_STACKS_KEPT) {
                observed.frames.remove(&stack_id);
            }
            stacks_in_use.extend(observed.sites.stacks().map(|(id, _)| id));
        }
        // The kernel's stacks are shared by every process: those no site
        // refers to would fill the map for good.
        self.probes.prune_stacks(stacks_in_use);
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

/// Stacks per process that hold no live bytes any more, kept for their
/// allocation totals (the ones that allocated most).
const DEAD_STACKS_KEPT: usize = 2048;

fn process_info(
    o: &Observed,
    heap: HeapBreakdown,
    t: f64,
    policy: &LeakPolicy,
    limit: Option<MemoryLimit>,
) -> ProcessInfo {
    let trend = o.history.trend(policy.window.as_secs_f64());
    let leak_suspected = trend.is_leak(policy);
    let time_to_limit_seconds = limit.as_ref().and_then(|limit| {
        trend.time_to_limit(limit.limit_bytes, limit.usage_bytes?, leak_suspected)
    });
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
        leak_suspected,
        allocated_bytes_total: allocated.total(),
        freed_bytes_total: freed.total(),
        allocated_bytes_by_source: allocated,
        freed_bytes_by_source: freed,
        accounting: o.accounting,
        probe_hits_per_second: o.hits_per_second,
        probe_hits_total: o.stats.probe_hits,
        observed_seconds: t,
        heap_history: o.history.seconds_ago(t),
        container_info: o.attribution.info(),
        arena_size_mismatch: o.arena_size_mismatch,
        census_unsupported: None,
        heap_baseline: o.baseline,
        memory_limit_bytes: limit.as_ref().map(|l| l.limit_bytes),
        memory_high_bytes: limit.as_ref().and_then(|l| l.high_bytes),
        memory_usage_bytes: limit.as_ref().and_then(|l| l.usage_bytes),
        memory_limit_source: limit.map(|l| l.source),
        time_to_limit_seconds,
        gc: GcInfo::from_stats(
            &o.stats,
            o.gc.state,
            o.gc.source.clone(),
            o.gc.reason.clone(),
        ),
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
