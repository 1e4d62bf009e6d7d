//! Typed handles of the maps the agent reads and writes, taken out of the
//! loaded object by name once.
use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use pymem_common::{
    BlockKey, BudgetState, ProcStats, PyFrame, PyLayout, PyStack, SyscallModeState, counter,
    names::map,
};

pub(super) type StatsMap = PerCpuHashMap<MapData, u32, ProcStats>;
pub(super) type LiveMap = HashMap<MapData, BlockKey, u64>;

/// A read-only handle of `PROC_STATS` for other threads (the census reads
/// a process's counters while it holds the process paused).
#[derive(Clone)]
pub struct StatsReader(std::sync::Arc<StatsMap>);

impl StatsReader {
    /// Sums the per-CPU counters of one process.
    pub fn read(&self, pid: u32) -> Option<ProcStats> {
        sum_stats(&self.0, pid)
    }
}

fn sum_stats(stats: &StatsMap, pid: u32) -> Option<ProcStats> {
    let per_cpu = stats.get(&pid, 0).ok()?;
    let mut total = ProcStats::default();
    for cpu in per_cpu.iter() {
        total.accumulate(cpu);
    }
    Some(total)
}

/// The maps the observer's calls touch.
pub(super) struct Maps {
    stats: StatsMap,
    pub(super) reader: StatsReader,
    tracked: HashMap<MapData, u32, u64>,
    syscall_mode: HashMap<MapData, u32, SyscallModeState>,
    counters: PerCpuArray<MapData, u64>,
    layouts: HashMap<MapData, u32, PyLayout>,
    stacks: HashMap<MapData, u64, PyStack>,
    budget: HashMap<MapData, u32, BudgetState>,
    sampler: HashMap<MapData, u32, u64>,
}

/// What the background sweep deletes from: the live-block maps (nothing
/// else uses them) and its own handles of `PROC_STATS` and `STACKS`.
pub(super) struct SweptMaps {
    pub live: Vec<(&'static str, LiveMap)>,
    pub stats: StatsMap,
    pub stacks: HashMap<MapData, u64, PyStack>,
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    T::try_from(take(ebpf, name)?).with_context(|| format!("map {name}"))
}

/// A second handle of `PROC_STATS` (its fd duplicated), for another thread.
fn clone_stats(stats: &Map) -> Result<StatsMap> {
    let Map::PerCpuHashMap(data) = stats else {
        return Err(anyhow!("{} is not a per-CPU hash map", map::PROC_STATS));
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    let data = MapData::from_fd(fd).context("duplicating PROC_STATS")?;
    Ok(StatsMap::try_from(Map::PerCpuHashMap(data))?)
}

/// A second handle of `STACKS` (its fd duplicated), for the sweep.
fn clone_stacks(stacks: &Map) -> Result<HashMap<MapData, u64, PyStack>> {
    let Map::HashMap(data) = stacks else {
        return Err(anyhow!("{} is not a hash map", map::STACKS));
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    let data = MapData::from_fd(fd).context("duplicating STACKS")?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

impl Maps {
    /// Takes the maps out of `ebpf`; the ring buffer is returned on its own
    /// since a task of its own reads it.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<(Self, SweptMaps, RingBuf<MapData>)> {
        let events = typed(ebpf, map::EVENTS)?;
        let stats = take(ebpf, map::PROC_STATS)?;
        let stacks = take(ebpf, map::STACKS)?;
        let swept = SweptMaps {
            live: [map::ARENAS, map::RAW_LIVE, map::EXT_LIVE, map::SYS_LIVE]
                .into_iter()
                .map(|name| Ok((name, typed(ebpf, name)?)))
                .collect::<Result<_>>()?,
            stats: clone_stats(&stats)?,
            stacks: clone_stacks(&stacks)?,
        };
        let reader = StatsReader(std::sync::Arc::new(clone_stats(&stats)?));
        let maps = Self {
            reader,
            stats: StatsMap::try_from(stats)?,
            tracked: typed(ebpf, map::TRACKED)?,
            syscall_mode: typed(ebpf, map::SYSCALL_MODE)?,
            counters: typed(ebpf, map::COUNTERS)?,
            layouts: typed(ebpf, map::PY_LAYOUT)?,
            stacks: HashMap::try_from(stacks).with_context(|| format!("map {}", map::STACKS))?,
            budget: typed(ebpf, map::BUDGET)?,
            sampler: typed(ebpf, map::SAMPLER)?,
        };
        Ok((maps, swept, events))
    }

    pub(super) fn track(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        self.tracked
            .insert(pid, arena_size, 0)
            .context(map::TRACKED)
    }

    pub(super) fn set_syscall_mode(&mut self, pid: u32, state: SyscallModeState) -> Result<()> {
        self.syscall_mode
            .insert(pid, state, 0)
            .context(map::SYSCALL_MODE)
    }

    pub(super) fn end_syscall_mode(&mut self, pid: u32) {
        let _ = self.syscall_mode.remove(&pid);
    }

    pub(super) fn set_layout(&mut self, pid: u32, layout: PyLayout) -> Result<()> {
        self.layouts.insert(pid, layout, 0).context(map::PY_LAYOUT)
    }

    /// A captured stack, innermost frame first.
    pub(super) fn stack(&self, id: u64) -> Option<Vec<PyFrame>> {
        let stack = self.stacks.get(&id, 0).ok()?;
        let len = (stack.len as usize).min(stack.frames.len());
        Some(stack.frames[..len].to_vec())
    }

    /// Removes every per-process entry of `pid` (not its live blocks).
    pub(super) fn forget(&mut self, pid: u32) {
        let _ = self.layouts.remove(&pid);
        let _ = self.tracked.remove(&pid);
        let _ = self.syscall_mode.remove(&pid);
        let _ = self.stats.remove(&pid);
        let _ = self.budget.remove(&pid);
        let _ = self.sampler.remove(&pid);
    }

    /// Sums the per-CPU counters of one process.
    pub(super) fn process_stats(&self, pid: u32) -> Option<ProcStats> {
        sum_stats(&self.stats, pid)
    }

    /// One kernel-side counter, summed over CPUs.
    pub(super) fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// Failed insertions (and lost events) per map.
    pub(super) fn kernel_errors(&self) -> Vec<(&'static str, u64)> {
        counter::MAP_ERRORS
            .iter()
            .map(|&(index, name)| (name, self.counter(index)))
            .collect()
    }
}
