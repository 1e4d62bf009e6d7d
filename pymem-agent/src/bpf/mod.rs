//! Everything that talks to the kernel: loading the eBPF object (`load`),
//! attaching its programs (`links`, `multi`, closed by `reaper`), the maps
//! (`maps`, swept by `sweep`), the event ring buffer (`events`), the kernel
//! side's log (`kernel_log`) and tracefs.
use anyhow::Result;
use pymem_common::{ProcStats, PyFrame, PyLayout, SyscallModeState, counter};

use crate::discover::{Binary, BinaryId};

pub mod events;
mod kernel_log;
mod links;
mod load;
mod maps;
mod multi;
mod reaper;
mod sweep;
mod tracefs;

pub use links::GcAttach;
pub use load::KernelConfig;
pub use maps::StatsReader;

/// Owns the loaded programs, every attachment and the maps.
pub struct Probes {
    links: links::Links,
    maps: maps::Maps,
    /// Deletes what exited processes left, off the observer's thread.
    sweeper: sweep::Sweeper,
    _kernel_log: Option<kernel_log::KernelLog>,
}

impl Probes {
    /// Attaches the arena probes of a binary, once for all its processes.
    pub fn ensure_binary(&mut self, binary: &Binary) -> Result<()> {
        self.links.ensure_binary(binary)
    }

    /// Attaches the budgeted per-allocation probes of one process (and the
    /// collector's, where it has them) and ends its syscall accounting.
    /// Missing stubs only lose that source (logged); attach failures undo
    /// everything.
    pub fn attach_process(&mut self, pid: u32, binary: &Binary) -> Result<GcAttach> {
        let gc = self.links.attach_process(pid, binary)?;
        self.maps.end_syscall_mode(pid);
        Ok(gc)
    }

    /// Marks a process as observed (exit and fork events are reported for
    /// it) and accounts its memory outside pymalloc by syscalls until its
    /// per-allocation probes are attached.
    pub fn track(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        self.maps.track(pid, arena_size)?;
        self.account_by_syscalls(pid, arena_size)?;
        self.sweeper.tracked(pid);
        Ok(())
    }

    /// Stops the per-allocation probes of a process (budget or exit).
    pub fn detach_process(&mut self, pid: u32) {
        self.links.detach_process(pid);
    }

    /// Detaches everything and waits until the kernel is done with it.
    pub fn shutdown(&mut self) {
        self.links.shutdown();
        self.sweeper.finish();
    }

    /// Moves a process to syscall accounting: per-allocation probes off,
    /// brk/mmap tracepoints on from its current program break.
    pub fn switch_to_syscalls(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        self.detach_process(pid);
        self.account_by_syscalls(pid, arena_size)
    }

    fn account_by_syscalls(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        let brk = crate::discover::current_brk(pid).unwrap_or(0);
        self.maps
            .set_syscall_mode(pid, SyscallModeState { brk, arena_size })
    }

    /// Tells the kernel side where this process keeps its Python stack.
    pub fn set_layout(&mut self, pid: u32, layout: PyLayout) -> Result<()> {
        self.maps.set_layout(pid, layout)
    }

    /// A captured stack, innermost frame first.
    pub fn stack(&self, id: u64) -> Option<Vec<PyFrame>> {
        self.maps.stack(id)
    }

    /// Forgets every trace of an exited process.
    pub fn forget_process(&mut self, pid: u32) {
        self.detach_process(pid);
        self.maps.forget(pid);
        self.sweeper.forgotten(pid);
    }

    /// Detaches the arena probes of binaries no process runs any more.
    pub fn retain_binaries(&mut self, in_use: impl Fn(&BinaryId) -> bool) {
        self.links.retain_binaries(in_use);
    }

    /// Sums the per-CPU counters of one process.
    pub fn process_stats(&self, pid: u32) -> Option<ProcStats> {
        self.maps.process_stats(pid)
    }

    /// A handle of the per-process counters for another thread.
    pub fn stats_reader(&self) -> maps::StatsReader {
        self.maps.reader.clone()
    }

    /// Kernel-side drop counters (summed over CPUs).
    pub fn counter(&self, index: u32) -> u64 {
        self.maps.counter(index)
    }

    pub fn events_lost(&self) -> u64 {
        self.counter(counter::EVENTS_LOST)
    }

    pub fn live_map_full(&self) -> u64 {
        self.counter(counter::LIVE_MAP_FULL)
    }

    /// Failed insertions by the kernel side per map (the ring buffer's are
    /// its lost events), summed over CPUs.
    pub fn kernel_errors(&self) -> Vec<(&'static str, u64)> {
        self.maps.kernel_errors()
    }

    /// Entries of the swept kernel maps after their last sweep.
    pub fn map_entries(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.sweeper.entries()
    }

    pub fn attached_binaries(&self) -> usize {
        self.links.attached_binaries()
    }

    pub fn probe_links(&self) -> usize {
        self.links.probe_links()
    }

    /// Deletes the captured stacks none of `in_use` names (once they were
    /// unreferenced at the previous call too), off this thread.
    pub fn prune_stacks(&self, in_use: std::collections::HashSet<u64>) {
        self.sweeper.prune_stacks(in_use);
    }

    /// Deletes live-block entries and counters of processes that are gone
    /// (exits race with in-flight probes; this sweeps what they left). The
    /// work is done by a background thread: this returns at once, and asks
    /// `alive` only about the tracked processes.
    pub fn sweep(&mut self, alive: impl Fn(u32) -> bool) {
        self.sweeper.request(alive);
    }
}
