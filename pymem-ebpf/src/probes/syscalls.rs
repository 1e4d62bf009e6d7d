//! Syscall accounting for processes over their probe budget: growth of the
//! libc heap (brk) and of anonymous private mappings, from syscall
//! tracepoints that cost a fraction of a uprobe hit. Only processes the agent
//! put in `SYSCALL_MODE` are counted.
//!
//! Allocation sites go on for anonymous mappings (libc's blocks of 128 KiB
//! and more): they are sampled by bytes like blocks are. Heap growth by
//! `brk` is not attributed: the allocation that happens to cross the top of
//! the heap is as often a churning one reusing nothing as a leaking one, so
//! churn would be blamed.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use pymem_common::{PendingMmap, counter, event_kind};

use crate::maps::{
    PENDING_MMAP, SYSCALL_MODE, begin_call, count_alloc, current_ids, emit, end_call,
    forget_sampled, live, remember_sampled, stats,
};

// Field offsets of the syscall tracepoints (stable: after the 8-byte common
// header and the 8-byte syscall number slot).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const ARG3: usize = 40;
const RET: usize = 16;

const PROT_WRITE: u64 = 0x2;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_STACK: u64 = 0x20000;

#[tracepoint]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    match try_sys_exit_brk(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_exit_brk(ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    let state = SYSCALL_MODE.get_ptr_mut(tgid).ok_or(0u32)?;
    let state = unsafe { &mut *state };
    let new_brk: u64 = unsafe { ctx.read_at(RET) }.map_err(|_| 1u32)?;
    let old_brk = state.brk;
    state.brk = new_brk;
    if old_brk == 0 {
        return Ok(0);
    }
    let stats = stats(tgid).ok_or(1u32)?;
    if new_brk > old_brk {
        stats.sys_alloc_bytes += new_brk - old_brk;
    } else if new_brk < old_brk {
        // Blocks sampled above the new end were freed (their frees went
        // unseen once the per-allocation probes were detached).
        stats.sys_free_bytes += old_brk - new_brk;
        emit(
            event_kind::HEAP_SHRINK,
            tgid,
            tid,
            new_brk,
            old_brk - new_brk,
            0,
        );
    }
    Ok(0)
}

#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    match try_sys_enter_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_mmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let (pid_tgid, tgid, _) = current_ids();
    let state = unsafe { SYSCALL_MODE.get(tgid) }.ok_or(0u32)?;
    let read = |offset| unsafe { ctx.read_at::<u64>(offset) }.map_err(|_| 1u32);
    let (addr, len, prot, flags) = (read(ARG0)?, read(ARG1)?, read(ARG2)?, read(ARG3)?);
    let anonymous_private = flags & (MAP_PRIVATE | MAP_ANONYMOUS) == MAP_PRIVATE | MAP_ANONYMOUS;
    // Arenas are already counted; thread stacks and fixed remaps are not heap.
    // (The fd is ignored with MAP_ANONYMOUS, and libc passes it as a 32-bit
    // int, so it is not checked.)
    if addr != 0
        || !anonymous_private
        || flags & MAP_STACK != 0
        || prot & PROT_WRITE == 0
        || len == state.arena_size
    {
        return Ok(0);
    }
    begin_call::<{ counter::PENDING_MMAP }, _>(&PENDING_MMAP, pid_tgid, PendingMmap { len })
}

#[tracepoint]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    match try_sys_exit_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_exit_mmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    let pending = end_call(&PENDING_MMAP, pid_tgid).ok_or(0u32)?;
    let ret: i64 = unsafe { ctx.read_at(RET) }.map_err(|_| 1u32)?;
    if ret < 0 && ret > -4096 {
        return Ok(0);
    }
    let stats = stats(tgid).ok_or(1u32)?;
    let remembered = remember_sampled(live::SYS, tgid, tid, ret as u64, pending.len);
    count_alloc(stats, remembered, |stats| {
        stats.sys_alloc_bytes += pending.len
    });
    Ok(0)
}

#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    match try_sys_enter_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_munmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    if unsafe { SYSCALL_MODE.get(tgid) }.is_none() {
        return Ok(0);
    }
    let addr: u64 = unsafe { ctx.read_at(ARG0) }.map_err(|_| 1u32)?;
    let _len: u64 = unsafe { ctx.read_at(ARG1) }.map_err(|_| 1u32)?;
    let size = forget_sampled(live::SYS, tgid, tid, addr).ok_or(0u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    stats.sys_free_bytes += size;
    Ok(0)
}
