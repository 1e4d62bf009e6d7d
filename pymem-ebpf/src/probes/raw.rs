//! Blocks the interpreter takes from libc: uprobes on the interpreter's own
//! `malloc`/`calloc`/`realloc`/`free` PLT stubs. In PGO builds the raw
//! allocator is inlined behind guards at ~170 sites, but every one of them
//! still calls libc through the PLT. Attached per process and budgeted; the
//! entries are dispatched by `budgeted::budgeted_entry`.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_attach_cookie,
    macros::uretprobe,
    programs::{ProbeContext, RetProbeContext},
};
use pymem_common::{PendingCall, cookie, counter};

use crate::maps::{
    PENDING_RAW, begin_call, charge, count_alloc, current_ids, end_call, forget_sampled, live,
    remember_sampled, stats,
};

#[inline(always)]
fn begin(size: u64, old_addr: u64) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    let call = PendingCall { size, old_addr };
    begin_call::<{ counter::PENDING_RAW }, _>(&PENDING_RAW, pid_tgid, call)
}

pub(crate) fn try_raw_malloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let size: u64 = ctx.arg(0).ok_or(1u32)?;
    begin(size, 0)
}

pub(crate) fn try_raw_calloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let count: u64 = ctx.arg(0).ok_or(1u32)?;
    let elem: u64 = ctx.arg(1).ok_or(1u32)?;
    // An overflowing calloc returns NULL and is ignored on return.
    begin(count.wrapping_mul(elem), 0)
}

pub(crate) fn try_raw_realloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let old: u64 = ctx.arg(0).ok_or(1u32)?;
    let size: u64 = ctx.arg(1).ok_or(1u32)?;
    begin(size, old)
}

/// The return probe of every per-process hook: malloc/calloc/realloc, and
/// the collector function's end (cookie `GC_DONE`).
#[uretprobe]
pub fn raw_alloc_ret(ctx: RetProbeContext) -> u32 {
    let attached = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let result = if cookie::kind(attached) == cookie::GC_DONE {
        super::gc::try_gc_done(ctx.regs, attached)
    } else {
        try_raw_alloc_ret(&ctx)
    };
    match result {
        Ok(v) | Err(v) => v,
    }
}

fn try_raw_alloc_ret(ctx: &RetProbeContext) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    let pending = end_call(&PENDING_RAW, pid_tgid).ok_or(0u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    let addr: u64 = ctx.ret();
    if addr == 0 {
        // Failed: a failed realloc leaves the old block in place.
        return Ok(0);
    }
    if pending.old_addr != 0
        && let Some(old_size) = forget_sampled(live::RAW, tgid, tid, pending.old_addr)
    {
        stats.raw_free_bytes += old_size;
        stats.raw_frees += 1;
    }
    let remembered = remember_sampled(live::RAW, tgid, tid, addr, pending.size);
    count_alloc(stats, remembered, |stats| {
        stats.raw_alloc_bytes += pending.size;
        stats.raw_allocs += 1;
    });
    Ok(0)
}

pub(crate) fn try_raw_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    let addr: u64 = ctx.arg(0).ok_or(1u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    if addr == 0 {
        return Ok(0);
    }
    // Blocks allocated before we attached are unknown and stay uncounted.
    let size = forget_sampled(live::RAW, tgid, tid, addr).ok_or(0u32)?;
    stats.raw_free_bytes += size;
    stats.raw_frees += 1;
    Ok(0)
}
