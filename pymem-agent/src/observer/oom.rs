//! OOM kills: a post-mortem of each observed process the kernel kills for
//! memory, built as soon as the kill is reported (the event comes before
//! the victim's exit, which forgets it), while the victim's memory, /proc
//! entry and cgroup may still be read. Only observed Python processes get
//! one; other victims are ignored.
use std::time::Instant;

use log::{debug, warn};
use pymem_common::Event;

use super::Observer;
use crate::{
    census::unix_seconds_now,
    model::{HeapBreakdown, OOM_KILLS_KEPT, OomKill},
    sites::{self, keys::GroupBy},
};

/// Sites and types a post-mortem keeps.
const TOP_SITES: usize = 20;
const TOP_TYPES: usize = 20;

impl Observer {
    pub(super) fn on_oom_kill(&mut self, event: &Event) {
        let Some(pid) = self.observed_victim(event.tgid) else {
            debug!(
                "pid {}: killed for memory; not an observed Python process",
                event.tgid
            );
            return;
        };
        let kill = self.post_mortem(pid, event);
        log_kill(&kill);
        self.info.oom_kills_total += 1;
        // Published at once: the next sample may be a second away, and the
        // process is forgotten at its exit.
        let mut snapshot = self.snapshot.write().expect("snapshot lock");
        snapshot.oom_kills.insert(0, kill);
        snapshot.oom_kills.truncate(OOM_KILLS_KEPT);
        snapshot.agent.oom_kills_total = self.info.oom_kills_total;
    }

    /// The observed process of the record's pid: the kernel names the
    /// victim's thread that holds its memory, nearly always the group
    /// leader.
    fn observed_victim(&self, pid: u32) -> Option<u32> {
        if self.observed.contains_key(&pid) {
            return Some(pid);
        }
        let status = procfs::process::Process::new(i32::try_from(pid).ok()?)
            .ok()?
            .status()
            .ok()?;
        let tgid = u32::try_from(status.tgid).ok()?;
        self.observed.contains_key(&tgid).then_some(tgid)
    }

    /// What is known of `pid` now, the parts that vanish first read first:
    /// its stacks (its memory), then its cgroup (its /proc entry).
    fn post_mortem(&mut self, pid: u32, event: &Event) -> OomKill {
        let since_kill_ns = monotonic_ns().saturating_sub(event.ts_ns);
        let observed = self.observed.get_mut(&pid).expect("the victim is observed");
        let (sampled, unreadable_stacks) = observed.sites_at_kill(&self.probes);
        let memory_limit = self.limits.at_kill(pid, observed.cgroups.as_ref());
        let mut top_sites = sites::keys::regroup(&sampled, GroupBy::default());
        top_sites.truncate(TOP_SITES);
        let stats = self.probes.process_stats(pid).unwrap_or(observed.stats);
        let heap = HeapBreakdown::from_stats(&stats, &observed.offsets);
        let now = Instant::now().duration_since(observed.since).as_secs_f64();
        let mut heap_history = observed.history.seconds_ago(now);
        heap_history.push((0.0, heap.total()));
        let census = self.census.latest(pid);
        let process = self
            .snapshot
            .read()
            .expect("snapshot lock")
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .cloned();
        let recorded_after_ns = monotonic_ns().saturating_sub(event.ts_ns);
        OomKill {
            killed_at: unix_seconds_now() - since_kill_ns as f64 / 1e9,
            recorded_after_seconds: recorded_after_ns as f64 / 1e9,
            pid,
            comm: observed.process.comm.clone(),
            cmdline: observed.process.cmdline.clone(),
            python_version: observed.process.binary.interpreter.version.to_string(),
            container_info: observed.attribution.info(),
            heap_bytes: heap.total(),
            heap,
            heap_history,
            anon_rss_bytes: (event.size > 0).then_some(event.size),
            memory_limit,
            top_sites,
            unreadable_stacks,
            top_types: census
                .map(|c| c.heap.types.iter().take(TOP_TYPES).cloned().collect())
                .unwrap_or_default(),
            census_taken_at: census.map(|c| c.taken_at),
            process,
        }
    }
}

/// One line per kill, `key=value`, for log search.
fn log_kill(kill: &OomKill) {
    let or_unknown = |value: Option<u64>| value.map_or("unknown".to_string(), |v| v.to_string());
    let top_site = kill.top_sites.first().map_or("none".to_string(), |site| {
        sites::location(&site.file, site.line)
    });
    warn!(
        "OOM kill: pid={} comm={:?} python={} heap_bytes={} anon_rss_bytes={} limit_bytes={} cgroup={:?} top_site={} container_id={:?} pod={:?}",
        kill.pid,
        kill.comm,
        kill.python_version,
        kill.heap_bytes,
        or_unknown(kill.anon_rss_bytes),
        or_unknown(kill.memory_limit.limit_bytes),
        kill.memory_limit.cgroup.as_deref().unwrap_or(""),
        top_site,
        kill.container_info.container_id.as_deref().unwrap_or(""),
        kill.container_info.pod.as_deref().unwrap_or(""),
    );
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the events' `ts_ns`
/// (`bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}
