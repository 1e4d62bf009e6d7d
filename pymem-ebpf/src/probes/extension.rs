//! Extension buffers: numpy and friends report every data buffer through
//! `PyTraceMalloc_Track/Untrack`, whether tracemalloc runs or not.
//! Attached per process and budgeted; dispatched by
//! `budgeted::budgeted_entry`.
use aya_ebpf::programs::ProbeContext;

use crate::maps::{
    charge, count_alloc, current_ids, forget_sampled, live, remember_sampled, stats,
};

pub(crate) fn try_ext_track(ctx: &ProbeContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    // PyTraceMalloc_Track(unsigned int domain, uintptr_t ptr, size_t size)
    let addr: u64 = ctx.arg(1).ok_or(1u32)?;
    let size: u64 = ctx.arg(2).ok_or(1u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    // Tracking a pointer again replaces its size, as tracemalloc does.
    if let Some(old) = forget_sampled(live::EXT, tgid, tid, addr) {
        stats.ext_free_bytes += old;
        stats.ext_frees += 1;
    }
    let remembered = remember_sampled(live::EXT, tgid, tid, addr, size);
    count_alloc(stats, remembered, |stats| {
        stats.ext_alloc_bytes += size;
        stats.ext_allocs += 1;
    });
    Ok(0)
}

pub(crate) fn try_ext_untrack(ctx: &ProbeContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    // PyTraceMalloc_Untrack(unsigned int domain, uintptr_t ptr)
    let addr: u64 = ctx.arg(1).ok_or(1u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    let size = forget_sampled(live::EXT, tgid, tid, addr).ok_or(0u32)?;
    stats.ext_free_bytes += size;
    stats.ext_frees += 1;
    Ok(0)
}
