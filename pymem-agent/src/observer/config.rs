//! The observer's settings (`ObserverConfig`), the command-line options that
//! set them (`pymem agent`, `pymem top`), and their defaults, each written
//! once here for both.
use std::time::Duration;

use anyhow::Result;

use crate::{bpf::KernelConfig, census::CensusConfig, discover::CmdlineMode, model::LeakPolicy};

/// A default duration with the text its option shows in `--help`.
pub struct DurationDefault {
    pub value: Duration,
    pub text: &'static str,
}

macro_rules! seconds {
    ($secs:literal) => {
        DurationDefault {
            value: Duration::from_secs($secs),
            text: concat!($secs, "s"),
        }
    };
}

pub const WINDOW: DurationDefault = seconds!(60);
pub const SAMPLE_INTERVAL: DurationDefault = seconds!(1);
pub const LEAK_MIN_GROWTH: u64 = 1 << 20;
/// R² a growing heap's samples must reach before a leak is suspected.
pub const LEAK_MIN_FIT: f64 = 0.8;
pub const PROBE_BUDGET: u64 = 1000;
pub const PROBE_BURST: u64 = 500;
pub const PROBE_FIRST_BURST: u64 = 100;
pub const PROBE_DELAY: DurationDefault = seconds!(5);
pub const SAMPLE_BYTES: u64 = 256 << 10;
pub const RING_BUFFER_BYTES: u32 = 1 << 20;
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
pub const HISTORY: Duration = Duration::from_secs(300);
pub const SITE_METRICS: usize = 0;

#[derive(Clone, Copy, Debug)]
pub struct ObserverConfig {
    pub sample_interval: Duration,
    pub policy: LeakPolicy,
    /// Budgeted probe hits per process per second before it is moved to
    /// syscall accounting; 0 = never.
    pub hit_budget_per_sec: u64,
    /// Hits a process may spend at once on top of the rate, once it has
    /// spent as many within the rate.
    pub hit_budget_burst: u64,
    /// Hits a process may spend at once before that: what a hot loop costs
    /// before it is moved to syscall accounting.
    pub hit_budget_first_burst: u64,
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
    /// Object censuses: automatic ones, concurrency, copy limit, metrics.
    pub census: CensusConfig,
    /// What of each command line is kept (and so shown).
    pub cmdline: CmdlineMode,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            sample_interval: SAMPLE_INTERVAL.value,
            policy: LeakPolicy::default(),
            hit_budget_per_sec: PROBE_BUDGET,
            hit_budget_burst: PROBE_BURST,
            hit_budget_first_burst: PROBE_FIRST_BURST,
            rescan_interval: RESCAN_INTERVAL,
            history: HISTORY,
            probe_delay: PROBE_DELAY.value,
            sample_bytes: SAMPLE_BYTES,
            ring_buffer_bytes: RING_BUFFER_BYTES,
            site_metrics: SITE_METRICS,
            perf_uprobes: false,
            census: CensusConfig::default(),
            // A local view (`pymem top` without an agent) shows it all.
            cmdline: CmdlineMode::Full,
        }
    }
}

impl ObserverConfig {
    /// The settings the kernel programs are loaded with.
    pub fn kernel(&self) -> KernelConfig {
        KernelConfig {
            hit_budget_per_sec: self.hit_budget_per_sec,
            hit_budget_burst: self.hit_budget_burst,
            hit_budget_first_burst: self.hit_budget_first_burst,
            ring_buffer_bytes: self.ring_buffer_bytes,
            perf_uprobes: self.perf_uprobes,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct ObserveArgs {
    /// Trailing window for growth rate and leak detection (e.g. 60s, 5m).
    #[arg(long, default_value = WINDOW.text, value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// How often the kernel counters are sampled.
    #[arg(long, default_value = SAMPLE_INTERVAL.text, value_parser = humantime::parse_duration)]
    pub sample_interval: Duration,
    /// Minimum growth over one window before a leak is suspected, in bytes.
    #[arg(long, default_value_t = LEAK_MIN_GROWTH)]
    pub leak_min_growth: u64,
    /// Per-process budget of allocation-probe hits per second (each costs
    /// ~1-10 µs); a process above it is moved to syscall accounting. 0
    /// disables the budget.
    #[arg(long, default_value_t = PROBE_BUDGET)]
    pub probe_budget: u64,
    /// Allocation-probe hits a process may spend at once before the
    /// per-second budget applies (~5 ms of probe time at ~10 µs a hit),
    /// once it has spent as many within the budget.
    #[arg(long, default_value_t = PROBE_BURST)]
    pub probe_burst: u64,
    /// Allocation-probe hits a process may spend at once before it has
    /// earned --probe-burst: what a hot loop in a quiet process costs
    /// before it is moved to syscall accounting (~1 ms at ~10 µs a hit).
    #[arg(long, default_value_t = PROBE_FIRST_BURST)]
    pub probe_first_burst: u64,
    /// Process age before per-allocation probes are attached; until then
    /// (start-up imports) memory outside pymalloc is accounted by syscalls.
    #[arg(long, default_value = PROBE_DELAY.text, value_parser = humantime::parse_duration)]
    pub probe_delay: Duration,
    /// Mean bytes between Python-stack samples of allocations outside
    /// pymalloc (arenas are always attributed); 0 disables sampling.
    #[arg(long, default_value_t = SAMPLE_BYTES)]
    pub sample_bytes: u64,
    /// Size of the kernel-to-agent event ring buffer in bytes (a power of
    /// two, at least 4096). Events that do not fit are counted in
    /// pymem_events_lost_total.
    #[arg(long, default_value_t = RING_BUFFER_BYTES, value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,
    /// One perf-event uprobe per hook, as on kernels before 6.6, even where
    /// multi-uprobe links work (to test that path).
    #[arg(long, hide = true)]
    pub perf_uprobes: bool,
}

fn parse_ring_size(value: &str) -> Result<u32, String> {
    let bytes: u32 = value.parse().map_err(|e| format!("{value:?}: {e}"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} is not a power of two >= 4096"));
    }
    Ok(bytes)
}

impl ObserveArgs {
    pub fn observer_config(&self) -> ObserverConfig {
        ObserverConfig {
            sample_interval: self.sample_interval,
            policy: LeakPolicy {
                window: self.window,
                min_growth_bytes: self.leak_min_growth as f64,
                ..LeakPolicy::default()
            },
            hit_budget_per_sec: self.probe_budget,
            hit_budget_burst: self.probe_burst,
            hit_budget_first_burst: self.probe_first_burst,
            probe_delay: self.probe_delay,
            sample_bytes: self.sample_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            perf_uprobes: self.perf_uprobes,
            ..ObserverConfig::default()
        }
    }
}

/// The object census options of `pymem agent`.
#[derive(clap::Args, Clone, Debug)]
pub struct CensusArgs {
    /// Take an object census of each leak-suspected process this often
    /// (e.g. 5m; each one pauses the process while its heap is copied);
    /// off unless set. Censuses on demand (`/types`, `pymem types`) work
    /// either way.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub census_interval: Option<Duration>,
    /// Censuses running at once, agent-wide (each holds a copy of a heap;
    /// 0 counts as 1).
    #[arg(long, value_name = "N", default_value_t = crate::census::stage::CONCURRENCY)]
    pub census_concurrency: usize,
    /// Most bytes a census copies out of one process (a bigger heap is
    /// refused, with an error); lowered to a fifth of the memory the agent
    /// has free under its own limit (a census peaks at about 5x its copy).
    #[arg(long, value_name = "BYTES", default_value_t = crate::census::stage::MAX_BYTES)]
    pub census_max_bytes: u64,
    /// Export `pymem_objects` and `pymem_object_bytes` for each process's N
    /// heaviest types in its latest census; 0 = off. Every type is a
    /// series: keep N small.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub type_metrics: usize,
    /// Census each process that was already running (or was forked) when
    /// pymem found it, once, so that its `heap_bytes` includes what it held
    /// before (`heap_baseline: census`); each census pauses its process for
    /// the copy. With false, such processes report the heap allocated since
    /// attach (`heap_baseline: since_attach`).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub census_baseline: bool,
    /// Most of one CPU, in percent, that censuses nobody asked for
    /// (baselines, automatic ones) take over time: after one that took T
    /// of CPU (the agent's pause, copy and parse threads, not the wall
    /// time a loaded node stretches) the next waits T x (100 / PERCENT - 1);
    /// 100 runs them back to back.
    /// Censuses asked for (`pymem types`, `/census`) never wait.
    #[arg(long, value_name = "PERCENT", default_value_t = crate::census::stage::BACKGROUND_CPU_PERCENT,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub census_background_cpu: u32,
}

impl CensusArgs {
    pub fn census_config(&self) -> CensusConfig {
        CensusConfig {
            interval: self.census_interval.filter(|d| !d.is_zero()),
            concurrency: self.census_concurrency,
            max_bytes: self.census_max_bytes,
            type_metrics: self.type_metrics,
            baseline: self.census_baseline,
            background_cpu_percent: self.census_background_cpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        observe: ObserveArgs,
    }

    #[test]
    fn options_left_out_give_the_default_config() {
        let parsed = Cli::parse_from(["pymem"]).observe.observer_config();
        let default = ObserverConfig::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
        assert_eq!(parsed.policy.window, Duration::from_secs(60));
        assert_eq!(parsed.policy.min_growth_bytes, 1024.0 * 1024.0);
    }
}
