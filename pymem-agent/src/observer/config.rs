//! The observer's settings as command-line options (`pymem agent`, `pymem
//! top`).
use std::time::Duration;

use anyhow::Result;

use super::ObserverConfig;
use crate::model::LeakPolicy;

#[derive(clap::Args, Clone, Debug)]
pub struct ObserveArgs {
    /// Trailing window for growth rate and leak detection (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// How often the kernel counters are sampled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample_interval: Duration,
    /// Minimum growth over one window before a leak is suspected, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub leak_min_growth: u64,
    /// Per-process budget of allocation-probe hits per second (each costs
    /// ~1-10 µs); a process above it is moved to syscall accounting. 0
    /// disables the budget.
    #[arg(long, default_value_t = 1000)]
    pub probe_budget: u64,
    /// Allocation-probe hits a process may spend at once before the
    /// per-second budget applies (~5 ms of probe time at ~10 µs a hit).
    #[arg(long, default_value_t = 500)]
    pub probe_burst: u64,
    /// Process age before per-allocation probes are attached; until then
    /// (start-up imports) memory outside pymalloc is accounted by syscalls.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub probe_delay: Duration,
    /// Mean bytes between Python-stack samples of allocations outside
    /// pymalloc (arenas are always attributed); 0 disables sampling.
    #[arg(long, default_value_t = 256 << 10)]
    pub sample_bytes: u64,
    /// Size of the kernel-to-agent event ring buffer in bytes (a power of
    /// two, at least 4096). Events that do not fit are counted in
    /// pymem_events_lost_total.
    #[arg(long, default_value_t = 1 << 20, value_parser = parse_ring_size)]
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
            probe_delay: self.probe_delay,
            sample_bytes: self.sample_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            perf_uprobes: self.perf_uprobes,
            ..ObserverConfig::default()
        }
    }
}
