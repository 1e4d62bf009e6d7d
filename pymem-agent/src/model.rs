//! The per-process model: heap size from the kernel counters, its trend over
//! a trailing window, and the leak verdict. Pure data, no I/O: the observer
//! feeds it samples, the exporters read snapshots.
use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use pymem_common::ProcStats;
use serde::{Deserialize, Serialize};

use crate::{cpython::heap::TypeStats, limits::CgroupLimit, observer::config, sites::Site};

/// How a process's memory outside pymalloc is being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accounting {
    /// The process is starting up (imports allocate in bursts): memory
    /// outside pymalloc comes from brk/mmap syscalls until its per-allocation
    /// probes are attached after `--probe-delay`.
    Startup,
    /// uprobes on the interpreter's libc allocator and extension tracking:
    /// exact live bytes.
    #[default]
    Probes,
    /// The process went over its probe budget: its per-allocation probes
    /// are detached and growth outside pymalloc comes from brk/mmap
    /// syscalls (live bytes at the switch are kept).
    Syscalls,
}

/// Tuning of the leak detector.
#[derive(Clone, Copy, Debug)]
pub struct LeakPolicy {
    /// Trailing window for the growth slope.
    pub window: Duration,
    /// Growth over one window below which nothing is called a leak.
    pub min_growth_bytes: f64,
    /// How well a straight line must explain the samples (R²): steady churn
    /// scatters around a flat line and stays far below this.
    pub min_fit: f64,
}

impl Default for LeakPolicy {
    fn default() -> Self {
        Self {
            window: config::WINDOW.value,
            min_growth_bytes: config::LEAK_MIN_GROWTH as f64,
            min_fit: config::LEAK_MIN_FIT,
        }
    }
}

/// Heap bytes by source, from summed kernel counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapBreakdown {
    pub arena_bytes: u64,
    pub raw_bytes: u64,
    pub extension_bytes: u64,
    /// Growth outside pymalloc seen through syscalls (syscall accounting).
    pub syscall_bytes: u64,
    /// Memory outside pymalloc that was live before observation started,
    /// measured by the latest census (0 for processes observed from their
    /// start). Its frees are not seen; each census measures it anew.
    #[serde(default)]
    pub before_attach_bytes: u64,
}

/// What a process held before pymem saw it, from a census: the arena
/// bytes the counters missed (negative when arenas older than the agent
/// were freed since) and the memory outside pymalloc older than attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapOffsets {
    pub arena_bytes: i64,
    pub before_attach_bytes: u64,
}

impl HeapOffsets {
    /// The offsets that make the counters `at_copy` (read while the census
    /// copied the heap) add up to what the census found.
    pub fn from_census(arena_bytes: u64, outside_pymalloc_bytes: u64, at_copy: &ProcStats) -> Self {
        let counted = HeapBreakdown::from_stats(at_copy, &Self::default());
        let arena_net =
            i128::from(at_copy.arena_alloc_bytes) - i128::from(at_copy.arena_free_bytes);
        let arena = (i128::from(arena_bytes) - arena_net).clamp(i64::MIN.into(), i64::MAX.into());
        let outside = counted.raw_bytes + counted.extension_bytes + counted.syscall_bytes;
        Self {
            arena_bytes: arena as i64,
            before_attach_bytes: outside_pymalloc_bytes.saturating_sub(outside),
        }
    }
}

impl HeapBreakdown {
    pub fn from_stats(s: &ProcStats, offsets: &HeapOffsets) -> Self {
        let arena = i128::from(s.arena_alloc_bytes) - i128::from(s.arena_free_bytes)
            + i128::from(offsets.arena_bytes);
        Self {
            arena_bytes: arena.clamp(0, u64::MAX.into()) as u64,
            raw_bytes: s.raw_alloc_bytes.saturating_sub(s.raw_free_bytes),
            extension_bytes: s.ext_alloc_bytes.saturating_sub(s.ext_free_bytes),
            syscall_bytes: s.sys_alloc_bytes.saturating_sub(s.sys_free_bytes),
            before_attach_bytes: offsets.before_attach_bytes,
        }
    }

    pub fn total(&self) -> u64 {
        self.arena_bytes
            + self.raw_bytes
            + self.extension_bytes
            + self.syscall_bytes
            + self.before_attach_bytes
    }
}

/// Where a process's `heap_bytes` starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeapBaseline {
    /// Observed from its start: the counters hold the whole heap.
    #[default]
    Observed,
    /// Older than its observation and not (yet) censused: `heap_bytes` is
    /// what was allocated since pymem attached, not the whole heap.
    SinceAttach,
    /// Older than its observation; a census measured what it held before,
    /// and the counters keep it up to date since.
    Census,
}

/// The trailing samples of one process's heap.
#[derive(Clone, Debug, Default)]
pub struct HeapHistory {
    /// (seconds since observation started, heap bytes)
    samples: VecDeque<(f64, f64)>,
}

impl HeapHistory {
    /// Keeps at most `retain` seconds of samples (the UI wants more history
    /// than the leak window).
    pub fn push(&mut self, t: f64, heap: u64, retain: f64) {
        self.samples.push_back((t, heap as f64));
        while self
            .samples
            .front()
            .is_some_and(|&(first, _)| t - first > retain)
        {
            self.samples.pop_front();
        }
    }

    /// The samples as (seconds before `now`, bytes), oldest first: what
    /// the API and post-mortems show.
    pub fn seconds_ago(&self, now: f64) -> Vec<(f64, u64)> {
        self.samples
            .iter()
            .map(|&(at, bytes)| ((now - at).max(0.0), bytes as u64))
            .collect()
    }

    /// Least-squares slope (bytes/s) and R² over the last `window` seconds,
    /// with the time span actually covered.
    pub fn trend(&self, window: f64) -> Trend {
        let Some(&(last_t, _)) = self.samples.back() else {
            return Trend::default();
        };
        let recent: Vec<(f64, f64)> = self
            .samples
            .iter()
            .copied()
            .filter(|&(t, _)| last_t - t <= window + 1e-9)
            .collect();
        if recent.len() < 2 {
            return Trend::default();
        }
        let n = recent.len() as f64;
        let mean_t = recent.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = recent.iter().map(|p| p.1).sum::<f64>() / n;
        let (mut stt, mut sty, mut syy) = (0.0, 0.0, 0.0);
        for &(t, y) in &recent {
            stt += (t - mean_t) * (t - mean_t);
            sty += (t - mean_t) * (y - mean_y);
            syy += (y - mean_y) * (y - mean_y);
        }
        if stt == 0.0 {
            return Trend::default();
        }
        let slope = sty / stt;
        let fit = if syy == 0.0 {
            0.0
        } else {
            (sty * sty) / (stt * syy)
        };
        Trend {
            slope,
            fit,
            span: last_t - recent[0].0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Trend {
    /// bytes per second
    pub slope: f64,
    /// R² of the linear fit, 0..1
    pub fit: f64,
    /// seconds covered by the samples used
    pub span: f64,
}

impl Trend {
    /// Growth sustained over a full window: positive slope, a good linear
    /// fit, and enough bytes to matter. Churn has a flat, noisy trend.
    pub fn is_leak(&self, policy: &LeakPolicy) -> bool {
        let window = policy.window.as_secs_f64();
        self.span >= window * 0.9
            && self.slope > 0.0
            && self.fit >= policy.min_fit
            && self.slope * window >= policy.min_growth_bytes
    }

    /// Seconds until `usage_bytes` reaches `limit_bytes` at this slope
    /// (0 when already there), for a suspected leak only: a flat or
    /// shrinking heap never reaches its limit, and a rising but noisy one
    /// (churn, a poor linear fit) would give an alarming figure that means
    /// nothing.
    pub fn time_to_limit(&self, limit_bytes: u64, usage_bytes: u64, leak: bool) -> Option<f64> {
        if !leak || self.slope <= 0.0 || !self.slope.is_finite() {
            return None;
        }
        Some(limit_bytes.saturating_sub(usage_bytes) as f64 / self.slope)
    }
}

/// One process as the API and the exporters see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// PID inside the process's own PID namespace.
    pub ns_pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub python_version: String,
    /// Interpreter binary as the process sees it.
    pub binary: String,
    pub heap_bytes: u64,
    pub heap: HeapBreakdown,
    pub growth_bytes_per_second: f64,
    pub rss_bytes: u64,
    pub leak_suspected: bool,
    pub allocated_bytes_total: u64,
    pub freed_bytes_total: u64,
    /// Per source (`arena`, `raw`, `extension`, `syscall`).
    pub allocated_bytes_by_source: SourceTotals,
    pub freed_bytes_by_source: SourceTotals,
    pub accounting: Accounting,
    /// Budgeted probe hits per second over the last sample interval.
    pub probe_hits_per_second: f64,
    /// Budgeted probe hits since observation started: each one costs the
    /// process ~1-10 µs (a trap into the kernel).
    #[serde(default)]
    pub probe_hits_total: u64,
    /// Seconds since pymem started observing the process; memory allocated
    /// before that is in `heap_bytes` only once a census measured it
    /// (`heap_baseline`).
    pub observed_seconds: f64,
    /// Recent heap samples, oldest first: (seconds ago, bytes).
    pub heap_history: Vec<(f64, u64)>,
    /// Arena-like mappings of another size than this version's arenas
    /// recur: the arena size was guessed wrong, so `heap_bytes` misses the
    /// process's arenas (the agent logs a warning).
    #[serde(default)]
    pub arena_size_mismatch: bool,
    /// Why the object census cannot read this process's build, once a
    /// census was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_unsupported: Option<String>,
    /// Where `heap_bytes` starts from: the process's whole heap
    /// (`observed`, `census`) or only what it allocated since pymem attached
    /// (`since_attach`).
    #[serde(default)]
    pub heap_baseline: HeapBaseline,
    /// The memory limit that applies (the smallest cgroup `memory.max` or
    /// `memory.limit_in_bytes` up the process's hierarchy, else the host's
    /// `MemTotal`), and where it comes from (`memory_limit_source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// `cgroup v2 memory.max DIR`, `cgroup v1 memory.limit_in_bytes DIR` or
    /// `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_source: Option<String>,
    /// The smallest cgroup v2 `memory.high` up the hierarchy, when set
    /// below the limit: the kernel throttles and reclaims above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high_bytes: Option<u64>,
    /// Memory used in the cgroup whose limit applies (`memory.current`,
    /// `memory.usage_in_bytes`; `MemTotal - MemAvailable` for the host): all
    /// of its processes, page cache included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_usage_bytes: Option<u64>,
    /// Seconds until `memory_usage_bytes` reaches `memory_limit_bytes` at
    /// the heap's growth rate, 0 when already there; only while
    /// `leak_suspected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_limit_seconds: Option<f64>,
    /// The garbage collector's activity, as far as the probes see it.
    #[serde(default)]
    pub gc: GcInfo,
    /// Container and pod; its fields appear at the top level, and only when
    /// known.
    #[serde(flatten)]
    pub container_info: ContainerInfo,
}

/// Whether the collector's probes count a process's collections.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GcState {
    /// Not yet: they are attached with the per-allocation probes, after
    /// the process's start-up (`--probe-delay`).
    #[default]
    Pending,
    /// Attached: the figures grow with each collection.
    Counting,
    /// Detached with the per-allocation probes (the process went over its
    /// probe budget): the figures are those until then.
    Stopped,
    /// This build offers no way to see its collector (`reason`).
    Unavailable,
}

/// Garbage collections of one process since its collector's probes were
/// attached.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GcInfo {
    pub state: GcState,
    /// What the probes sit on: `usdt` (`python:gc__start`/`gc__done`) or
    /// the collector function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Why the collector is not seen, or why counting stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Collections per generation (0, 1, 2).
    pub collections: [u64; 3],
    /// Time spent collecting.
    pub seconds: f64,
    /// Objects the collections found unreachable (collected and
    /// uncollectable together: what the probes report).
    pub unreachable_objects: u64,
}

impl GcInfo {
    /// The figures of the counters `s`, in state `state`.
    pub fn from_stats(
        s: &ProcStats,
        state: GcState,
        source: Option<String>,
        reason: Option<String>,
    ) -> Self {
        Self {
            state,
            source,
            reason,
            collections: s.gc_collections,
            seconds: s.gc_ns as f64 / 1e9,
            unreachable_objects: s.gc_unreachable_objects,
        }
    }

    /// Whether the figures count anything (probes attached now or before).
    pub fn has_figures(&self) -> bool {
        matches!(self.state, GcState::Counting | GcState::Stopped)
    }
}

/// The container and Kubernetes pod of a process: all `None` outside
/// containers, and the pod's names `None` without the Kubernetes API.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The container's name in its pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceTotals {
    pub arena: u64,
    pub raw: u64,
    pub extension: u64,
    pub syscall: u64,
}

impl SourceTotals {
    pub fn allocated(s: &ProcStats) -> Self {
        Self {
            arena: s.arena_alloc_bytes,
            raw: s.raw_alloc_bytes,
            extension: s.ext_alloc_bytes,
            syscall: s.sys_alloc_bytes,
        }
    }

    pub fn freed(s: &ProcStats) -> Self {
        Self {
            arena: s.arena_free_bytes,
            raw: s.raw_free_bytes,
            extension: s.ext_free_bytes,
            syscall: s.sys_free_bytes,
        }
    }

    pub fn total(&self) -> u64 {
        self.arena + self.raw + self.extension + self.syscall
    }

    pub fn by_label(&self) -> [(&'static str, u64); 4] {
        [
            ("arena", self.arena),
            ("raw", self.raw),
            ("extension", self.extension),
            ("syscall", self.syscall),
        ]
    }
}

/// Agent-wide figures for the exporters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub events_lost_total: u64,
    /// Ring-buffer records skipped because they were not events.
    #[serde(default)]
    pub malformed_records_total: u64,
    pub live_map_full_total: u64,
    pub attached_binaries: usize,
    pub probe_links: usize,
    pub skipped_processes_total: u64,
    pub attach_errors_total: u64,
    pub budget_switches_total: u64,
    /// Failed kernel-side map operations by map (a full map, a full ring
    /// buffer): what the kernel could not record.
    pub kernel_errors_total: BTreeMap<String, u64>,
    /// Observed Python processes the kernel killed for memory (each has a
    /// post-mortem in `Snapshot::oom_kills` until newer ones push it out).
    #[serde(default)]
    pub oom_kills_total: u64,
    /// Inspections of new processes dropped because their queue was full
    /// (the next scan of /proc finds those processes).
    #[serde(default)]
    pub inspections_dropped_total: u64,
    /// Processes waiting to be inspected now.
    #[serde(default)]
    pub inspections_pending: usize,
    /// Object censuses queued (asked for, or baselines and automatic ones
    /// waiting for their pace).
    #[serde(default)]
    pub censuses_queued: usize,
    /// Entries of the kernel maps that are swept (stacks, live blocks,
    /// per-process counters) after their last sweep, by map.
    #[serde(default)]
    pub kernel_map_entries: BTreeMap<String, u64>,
}

/// What pymem knew of an observed Python process when the kernel's OOM
/// killer chose it, recorded before its memory and its /proc entry vanish.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OomKill {
    /// Unix time of the kill (the kernel marking the victim), in seconds.
    pub killed_at: f64,
    /// From the kill to this post-mortem being complete.
    pub recorded_after_seconds: f64,
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub python_version: String,
    /// Container and pod; its fields appear at the top level, and only when
    /// known.
    #[serde(flatten)]
    pub container_info: ContainerInfo,
    /// The heap at the kill, from the kernel counters.
    pub heap_bytes: u64,
    pub heap: HeapBreakdown,
    /// The heap up to the kill, oldest first: (seconds before the kill,
    /// bytes).
    pub heap_history: Vec<(f64, u64)>,
    /// Anonymous resident memory of the victim as the OOM killer saw it
    /// (absent where the kernel's record has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anon_rss_bytes: Option<u64>,
    /// Its memory cgroup and that cgroup's limit, read at the kill; its
    /// fields appear at the top level (`limit_bytes` always).
    #[serde(flatten)]
    pub memory_limit: CgroupLimit,
    /// Its heaviest allocation sites by live bytes (allocation samples,
    /// grouped by the application's own line), with stacks.
    pub top_sites: Vec<Site>,
    /// Stacks behind those sites that were first read at the kill and
    /// whose code could no longer be read (their frames say `<unknown>`).
    #[serde(default)]
    pub unreadable_stacks: usize,
    /// The heaviest types of its latest object census, if it had one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_types: Vec<TypeStats>,
    /// When that census was taken (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_taken_at: Option<f64>,
    /// The process as last published (`/api/v1/processes`), up to one
    /// sample interval before the kill; absent if it was never sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,
}

/// What the observer publishes once per sample interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub processes: Vec<ProcessInfo>,
    pub agent: AgentInfo,
    /// Each process's top allocation sites by live bytes, without their
    /// stacks: published only for `pymem agent --site-metrics N`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub top_sites: BTreeMap<u32, Vec<Site>>,
    /// Each process's heaviest types in its latest census: published only
    /// for `pymem agent --type-metrics N`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub top_types: BTreeMap<u32, Vec<TypeStats>>,
    /// Post-mortems of the latest OOM-killed Python processes, newest
    /// first (at most `OOM_KILLS_KEPT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oom_kills: Vec<OomKill>,
}

/// Post-mortems a snapshot keeps.
pub const OOM_KILLS_KEPT: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn history(points: impl IntoIterator<Item = (f64, f64)>) -> HeapHistory {
        let mut h = HeapHistory::default();
        for (t, y) in points {
            h.push(t, y as u64, 600.0);
        }
        h
    }

    #[test]
    fn steady_growth_is_a_leak_once_the_window_is_covered() {
        let policy = LeakPolicy {
            window: Duration::from_secs(10),
            ..Default::default()
        };
        let growing = history((0..=12).map(|t| (t as f64, 1e8 + t as f64 * 1e6)));
        let trend = growing.trend(10.0);
        assert!((trend.slope - 1e6).abs() < 1.0, "{trend:?}");
        assert!(trend.is_leak(&policy));
        let young = history((0..=5).map(|t| (t as f64, 1e8 + t as f64 * 1e6)));
        assert!(
            !young.trend(10.0).is_leak(&policy),
            "window not covered yet"
        );
    }

    /// The limit's fields sit at the top level, `limit_bytes` always (null
    /// when unknown), and a post-mortem reads back as it was written.
    #[test]
    fn a_post_mortem_keeps_its_shape_through_json() {
        let kill = OomKill {
            pid: 7,
            memory_limit: CgroupLimit {
                cgroup: Some("/app".into()),
                limit_unavailable: Some("no memory limit on cgroup /app or its ancestors".into()),
                ..CgroupLimit::default()
            },
            container_info: ContainerInfo {
                container_id: Some("abc".into()),
                ..ContainerInfo::default()
            },
            ..OomKill::default()
        };
        let json = serde_json::to_value(&kill).unwrap();
        assert_eq!(json["cgroup"], "/app");
        assert!(json["limit_bytes"].is_null());
        assert!(json.get("limit_cgroup").is_none());
        assert_eq!(json["container_id"], "abc");
        let back: OomKill = serde_json::from_value(json).unwrap();
        assert_eq!(back, kill);
    }

    #[test]
    fn churn_and_plateaus_are_not_leaks() {
        let policy = LeakPolicy {
            window: Duration::from_secs(10),
            ..Default::default()
        };
        let churn = history((0..=20).map(|t| (t as f64, 1e8 + if t % 2 == 0 { 4e6 } else { 0.0 })));
        assert!(!churn.trend(10.0).is_leak(&policy));
        let flat = history((0..=20).map(|t| (t as f64, 5e7)));
        assert!(!flat.trend(10.0).is_leak(&policy));
        let shrinking = history((0..=20).map(|t| (t as f64, 1e9 - t as f64 * 1e6)));
        assert!(!shrinking.trend(10.0).is_leak(&policy));
    }

    #[test]
    fn time_to_limit_only_for_a_leak_and_zero_at_the_limit() {
        let growing = Trend {
            slope: 1e6,
            fit: 0.99,
            span: 10.0,
        };
        assert_eq!(
            growing.time_to_limit(300_000_000, 100_000_000, true),
            Some(200.0)
        );
        assert_eq!(
            growing.time_to_limit(300_000_000, 300_000_000, true),
            Some(0.0)
        );
        assert_eq!(
            growing.time_to_limit(300_000_000, 400_000_000, true),
            Some(0.0)
        );
        assert_eq!(
            growing.time_to_limit(300_000_000, 100_000_000, false),
            None,
            "not a suspected leak"
        );
        for slope in [0.0, -1e6, f64::NAN, f64::INFINITY] {
            let trend = Trend { slope, ..growing };
            assert_eq!(trend.time_to_limit(300, 100, true), None, "{slope}");
        }
    }
}
