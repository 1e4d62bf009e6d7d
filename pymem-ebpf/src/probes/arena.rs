//! pymalloc arenas: the interpreter's own `mmap`/`munmap` calls (uprobes on
//! its PLT stubs, shared by every process of one binary). The attach cookie
//! carries the interpreter's arena size, so other mappings are ignored;
//! arena-like mappings of another size are counted, to catch a wrong size.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use pymem_common::{PendingCall, counter, event_kind};

use crate::maps::{
    PENDING_ARENA, begin_call, count_alloc, current_ids, emit, end_call, forget, live, remember,
    stats,
};

const PROT_READ_WRITE: u64 = 0x3;
const MAP_PRIVATE_ANONYMOUS: u64 = 0x22;

#[uprobe]
pub fn arena_mmap(ctx: ProbeContext) -> u32 {
    match try_arena_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_arena_mmap(ctx: &ProbeContext) -> Result<u32, u32> {
    let arena_size = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let len: u64 = ctx.arg(1).ok_or(1u32)?;
    let prot: u64 = ctx.arg(2).ok_or(1u32)?;
    let flags: u64 = ctx.arg(3).ok_or(1u32)?;
    if prot != PROT_READ_WRITE || flags != MAP_PRIVATE_ANONYMOUS {
        return Ok(0);
    }
    let (pid_tgid, tgid, _) = current_ids();
    if len != arena_size {
        if looks_like_an_arena(len) {
            let stats = stats(tgid).ok_or(1u32)?;
            stats.arena_size_mismatches += 1;
            stats.arena_size_mismatch_bytes += len;
        }
        return Ok(0);
    }
    let pending = PendingCall {
        size: len,
        old_addr: 0,
    };
    begin_call::<{ counter::PENDING_ARENA }, _>(&PENDING_ARENA, pid_tgid, pending)
}

/// pymalloc arenas of every version are powers of two of at least 256 KiB;
/// the agent decides whether such mappings recur often enough to mean that
/// its arena size is wrong for this interpreter.
#[inline(always)]
fn looks_like_an_arena(len: u64) -> bool {
    len >= SMALLEST_ARENA && len & (len - 1) == 0
}

const SMALLEST_ARENA: u64 = 256 << 10;

#[uretprobe]
pub fn arena_mmap_ret(ctx: RetProbeContext) -> u32 {
    match try_arena_mmap_ret(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_arena_mmap_ret(ctx: &RetProbeContext) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    let pending = end_call(&PENDING_ARENA, pid_tgid).ok_or(0u32)?;
    let addr: u64 = ctx.ret();
    // MAP_FAILED is (void *)-1.
    if addr == u64::MAX || addr == 0 {
        return Ok(0);
    }
    let stats = stats(tgid).ok_or(1u32)?;
    let remembered = remember(live::ARENAS, tgid, addr, pending.size);
    count_alloc(stats, remembered, |stats| {
        stats.arena_alloc_bytes += pending.size;
        stats.arena_allocs += 1;
    });
    emit(
        event_kind::ARENA_ALLOC,
        tgid,
        tid,
        addr,
        pending.size,
        crate::pystack::capture(tgid),
    );
    Ok(0)
}

#[uprobe]
pub fn arena_munmap(ctx: ProbeContext) -> u32 {
    match try_arena_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_arena_munmap(ctx: &ProbeContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    let addr: u64 = ctx.arg(0).ok_or(1u32)?;
    // Only arenas seen being mapped count: earlier ones were never added.
    let size = forget(live::ARENAS, tgid, addr).ok_or(0u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    stats.arena_free_bytes += size;
    stats.arena_frees += 1;
    emit(event_kind::ARENA_FREE, tgid, tid, addr, size, 0);
    Ok(0)
}
