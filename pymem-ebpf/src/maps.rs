//! Maps and load-time configuration shared by all probes.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use pymem_common::{
    BlockKey, BudgetState, Event, PendingCall, PendingMmap, ProcStats, SAMPLED_BIT,
    SyscallModeState, counter, event_kind,
};

/// Sustained budgeted probe hits per second a process may cost before the
/// agent is told to move it to cheaper accounting; 0 disables the budget.
/// Set at load time.
#[unsafe(no_mangle)]
static HIT_BUDGET_PER_SEC: u64 = 0;

/// Budgeted probe hits a process may spend at once, once it has shown it
/// stays within the rate.
#[unsafe(no_mangle)]
static HIT_BUDGET_BURST: u64 = 0;

/// Budgeted probe hits a process may spend at once before that (at most
/// `HIT_BUDGET_BURST`): a hot loop that starts after a quiet spell pays
/// this, not the whole burst, before it is told over budget.
#[unsafe(no_mangle)]
static HIT_BUDGET_FIRST_BURST: u64 = 0;

const NANO: u64 = 1_000_000_000;

/// Offset of `child_pid` in the `sched_process_fork` record (read from
/// tracefs by the agent: it moved when the comm fields became `__data_loc`).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u64 = 20;

/// Offsets of `pid` and `anon_rss` in the `oom/mark_victim` record (read
/// from tracefs by the agent; `anon_rss` is NO_OFFSET where the record has
/// none).
#[unsafe(no_mangle)]
static OOM_VICTIM_PID_OFFSET: u64 = 8;

#[unsafe(no_mangle)]
static OOM_VICTIM_ANON_RSS_OFFSET: u64 = pymem_common::NO_OFFSET;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Drop and error counters, see `pymem_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

#[map]
pub static PROC_STATS: PerCpuHashMap<u32, ProcStats> =
    PerCpuHashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Processes the agent observes (tgid -> arena size); used to follow forks.
#[map]
pub static TRACKED: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

#[map]
static ARENAS: HashMap<BlockKey, u64> = HashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

#[map]
static RAW_LIVE: HashMap<BlockKey, u64> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

#[map]
static EXT_LIVE: HashMap<BlockKey, u64> = HashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

#[map]
static SYS_LIVE: HashMap<BlockKey, u64> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// The live-block maps as the helpers below take them.
pub mod live {
    use pymem_common::counter;

    use super::Live;

    pub const ARENAS: Live<{ counter::ARENAS }> = Live {
        map: &super::ARENAS,
    };
    pub const RAW: Live<{ counter::RAW_LIVE }> = Live {
        map: &super::RAW_LIVE,
    };
    pub const EXT: Live<{ counter::EXT_LIVE }> = Live {
        map: &super::EXT_LIVE,
    };
    pub const SYS: Live<{ counter::SYS_LIVE }> = Live {
        map: &super::SYS_LIVE,
    };
}

#[map]
pub static PENDING_ARENA: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(16384, 0);

#[map]
pub static PENDING_RAW: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(16384, 0);

#[map]
pub static PENDING_MMAP: LruHashMap<u64, PendingMmap> = LruHashMap::with_max_entries(16384, 0);

/// Garbage collections in flight: thread (`pid_tgid`) -> start time (ns).
#[map]
pub static PENDING_GC: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

#[map]
pub static BUDGET: HashMap<u32, BudgetState> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Processes under syscall accounting, inserted by the agent.
#[map]
pub static SYSCALL_MODE: HashMap<u32, SyscallModeState> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

#[inline(always)]
pub fn current_ids() -> (u64, u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid, (pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
fn bump_counter(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

/// Counts a failed insertion into a map (`ERROR` in `counter`); the agent
/// reads the counters every sample and logs what grew. (No log record
/// here: its formatting took the busiest program's stack past the
/// verifier's 512 bytes.)
#[inline(always)]
pub fn map_error<const ERROR: u32>() {
    bump_counter(ERROR);
}

/// Sends one event; a full ring buffer is counted, never silent. False
/// when it was not sent.
#[inline(always)]
pub fn emit(kind: u32, tgid: u32, tid: u32, addr: u64, size: u64, stack_id: u64) -> bool {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                kind,
                tgid,
                tid,
                _pad: 0,
                ts_ns: unsafe { bpf_ktime_get_ns() },
                addr,
                size,
                stack_id,
            });
            entry.submit(0);
            true
        }
        None => {
            map_error::<{ counter::EVENTS_LOST }>();
            false
        }
    }
}

/// This CPU's counters of `tgid`, created on first use.
#[inline(always)]
pub fn stats(tgid: u32) -> Option<&'static mut ProcStats> {
    if let Some(ptr) = PROC_STATS.get_ptr_mut(tgid) {
        return Some(unsafe { &mut *ptr });
    }
    if PROC_STATS.insert(tgid, ProcStats::default(), 0).is_err() {
        map_error::<{ counter::PROC_STATS }>();
    }
    PROC_STATS.get_ptr_mut(tgid).map(|ptr| unsafe { &mut *ptr })
}

/// A live-block map with the index of its error counter.
#[derive(Clone, Copy)]
pub struct Live<const ERROR: u32> {
    pub map: &'static HashMap<BlockKey, u64>,
}

/// Remembers a live block; returns false (and counts it) when the map is full.
#[inline(always)]
pub fn remember<const ERROR: u32>(live: Live<ERROR>, tgid: u32, addr: u64, size: u64) -> bool {
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    if live.map.insert(key, size, 0).is_ok() {
        true
    } else {
        bump_counter(counter::LIVE_MAP_FULL);
        map_error::<ERROR>();
        false
    }
}

/// Counts an allocation as `count` says when its block was remembered, as
/// untracked when its live map was full.
#[inline(always)]
pub fn count_alloc(stats: &mut ProcStats, remembered: bool, count: impl FnOnce(&mut ProcStats)) {
    if remembered {
        count(stats);
    } else {
        stats.untracked_allocs += 1;
    }
}

/// Remembers a call until its return (or the syscall's exit); a failed
/// insertion is counted under `ERROR` and fails the probe.
#[inline(always)]
pub fn begin_call<const ERROR: u32, V>(
    map: &LruHashMap<u64, V>,
    pid_tgid: u64,
    call: V,
) -> Result<u32, u32> {
    match map.insert(pid_tgid, call, 0) {
        Ok(()) => Ok(0),
        Err(_) => {
            map_error::<ERROR>();
            Err(1)
        }
    }
}

/// Takes the call this thread began, if any.
#[inline(always)]
pub fn end_call<V: Copy>(map: &LruHashMap<u64, V>, pid_tgid: u64) -> Option<V> {
    let call = unsafe { map.get(pid_tgid) }.copied()?;
    let _ = map.remove(pid_tgid);
    Some(call)
}

/// Remembers a live block outside pymalloc, sampling it for its stack:
/// sampled blocks carry SAMPLED_BIT and are reported to the agent. Returns
/// false when the map is full.
#[inline(always)]
pub fn remember_sampled<const ERROR: u32>(
    live: Live<ERROR>,
    tgid: u32,
    tid: u32,
    addr: u64,
    size: u64,
) -> bool {
    match crate::pystack::sample_weight(tgid, size) {
        Some(weight) => {
            let stack_id = crate::pystack::capture(tgid);
            emit(event_kind::BLOCK_SAMPLE, tgid, tid, addr, weight, stack_id);
            remember(live, tgid, addr, size | SAMPLED_BIT)
        }
        None => remember(live, tgid, addr, size),
    }
}

/// Forgets a block outside pymalloc and returns its size; a sampled
/// block's free is reported to the agent.
#[inline(always)]
pub fn forget_sampled<const ERROR: u32>(
    live: Live<ERROR>,
    tgid: u32,
    tid: u32,
    addr: u64,
) -> Option<u64> {
    let size = forget(live, tgid, addr)?;
    if size & SAMPLED_BIT != 0 {
        emit(event_kind::BLOCK_SAMPLE_FREE, tgid, tid, addr, 0, 0);
    }
    Some(size & !SAMPLED_BIT)
}

/// Forgets a live block and returns its size, if it was known.
#[inline(always)]
pub fn forget<const ERROR: u32>(live: Live<ERROR>, tgid: u32, addr: u64) -> Option<u64> {
    let key = BlockKey {
        tgid,
        _pad: 0,
        addr,
    };
    let size = unsafe { live.map.get(key) }.copied()?;
    live.map.remove(key).ok()?;
    Some(size)
}

/// Charges one hit of a budgeted probe to `tgid` and tells the agent, once,
/// when the process has used up its budget: a token bucket refilled at
/// `HIT_BUDGET_PER_SEC`. Its capacity starts at `HIT_BUDGET_FIRST_BURST`
/// hits and grows by one for each hit spent within budget, up to
/// `HIT_BUDGET_BURST`: a process earns its burst by allocating slowly, and
/// one that is quiet until a hot loop starts is stopped after the first
/// burst.
#[inline(always)]
pub fn charge(tgid: u32, tid: u32, stats: &mut ProcStats) {
    stats.probe_hits += 1;
    let rate = unsafe { core::ptr::read_volatile(&HIT_BUDGET_PER_SEC) };
    if rate == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let state = match BUDGET.get_ptr_mut(tgid) {
        Some(ptr) => unsafe { &mut *ptr },
        None => {
            let burst = unsafe { core::ptr::read_volatile(&HIT_BUDGET_BURST) };
            let first = unsafe { core::ptr::read_volatile(&HIT_BUDGET_FIRST_BURST) }.min(burst);
            let fresh = BudgetState {
                nano_tokens: first * NANO,
                last_ns: now,
                notified: 0,
                capacity_hits: first as u32,
            };
            if BUDGET.insert(tgid, fresh, 0).is_err() {
                map_error::<{ counter::BUDGET }>();
            }
            match BUDGET.get_ptr_mut(tgid) {
                Some(ptr) => unsafe { &mut *ptr },
                None => return,
            }
        }
    };
    let capacity = state.capacity_hits as u64 * NANO;
    // Cap the elapsed time before multiplying so the refill cannot overflow.
    let elapsed = now.saturating_sub(state.last_ns).min(capacity / rate + 1);
    state.last_ns = now;
    state.nano_tokens = (state.nano_tokens + elapsed * rate).min(capacity);
    if state.nano_tokens >= NANO {
        state.nano_tokens -= NANO;
        let burst = unsafe { core::ptr::read_volatile(&HIT_BUDGET_BURST) };
        if (state.capacity_hits as u64) < burst {
            state.capacity_hits += 1;
        }
    } else if state.notified == 0 {
        state.notified = 1;
        emit(
            event_kind::BUDGET_EXCEEDED,
            tgid,
            tid,
            0,
            stats.probe_hits,
            0,
        );
    }
}

#[inline(always)]
pub fn fork_child_pid_offset() -> usize {
    unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) as usize }
}

#[inline(always)]
pub fn oom_victim_pid_offset() -> usize {
    unsafe { core::ptr::read_volatile(&OOM_VICTIM_PID_OFFSET) as usize }
}

/// `None` where the record has no `anon_rss`.
#[inline(always)]
pub fn oom_victim_anon_rss_offset() -> Option<usize> {
    let offset = unsafe { core::ptr::read_volatile(&OOM_VICTIM_ANON_RSS_OFFSET) };
    (offset != pymem_common::NO_OFFSET).then_some(offset as usize)
}
