//! The garbage collector: a collection's start (its generation) and end
//! (objects found unreachable), from the interpreter's USDT probes
//! (`python:gc__start`/`gc__done`, Debian's and Fedora's builds) or from the
//! entry and return of its collector function (builds with symbols). They
//! fire once per collection, up to thousands a second in allocation-heavy
//! code, so they are attached per process and charged to its budget like
//! the allocation probes; the entries are dispatched by
//! `budgeted::budgeted_entry` and the function's return by `raw_alloc_ret`.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
};
use pymem_common::{counter, probe_arg};

use crate::maps::{PENDING_GC, begin_call, charge, current_ids, end_call, stats};

/// Generations of the collector (3.14's incremental one keeps three too).
const GENERATIONS: u64 = 3;
/// More unreachable objects than this in one collection is a misread.
const MAX_UNREACHABLE: i64 = 1 << 40;

/// The register the cookie names. Read with a helper, not a load: the
/// compiler turns the match into one load from a computed offset, which
/// the verifier refuses on a context pointer.
#[inline(always)]
fn register(regs: *const pt_regs, which: u64) -> Option<u64> {
    use probe_arg::reg;
    let regs = unsafe { &*regs };
    let field: *const u64 = match which {
        reg::RAX => &regs.rax,
        reg::RBX => &regs.rbx,
        reg::RCX => &regs.rcx,
        reg::RDX => &regs.rdx,
        reg::RSI => &regs.rsi,
        reg::RDI => &regs.rdi,
        reg::RBP => &regs.rbp,
        reg::RSP => &regs.rsp,
        reg::R8 => &regs.r8,
        reg::R9 => &regs.r9,
        reg::R10 => &regs.r10,
        reg::R11 => &regs.r11,
        reg::R12 => &regs.r12,
        reg::R13 => &regs.r13,
        reg::R14 => &regs.r14,
        reg::R15 => &regs.r15,
        _ => return None,
    };
    unsafe { bpf_probe_read_kernel(field) }.ok()
}

/// The integer argument the cookie describes.
#[inline(always)]
fn argument(regs: *const pt_regs, cookie: u64) -> Option<i64> {
    let displacement = probe_arg::displacement(cookie);
    let which = probe_arg::register(cookie);
    if which == probe_arg::reg::NONE {
        return Some(displacement);
    }
    let value = register(regs, which)?;
    if !probe_arg::is_memory(cookie) {
        return Some(probe_arg::extend(cookie, value));
    }
    let at = value.wrapping_add(displacement as u64);
    let raw = match probe_arg::size(cookie) {
        1 => u64::from(unsafe { bpf_probe_read_user(at as *const u8) }.ok()?),
        2 => u64::from(unsafe { bpf_probe_read_user(at as *const u16) }.ok()?),
        4 => u64::from(unsafe { bpf_probe_read_user(at as *const u32) }.ok()?),
        _ => unsafe { bpf_probe_read_user(at as *const u64) }.ok()?,
    };
    Some(probe_arg::extend(cookie, raw))
}

pub(crate) fn try_gc_start(regs: *const pt_regs, cookie: u64) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    let generation = argument(regs, cookie).ok_or(1u32)?;
    if !(0..GENERATIONS as i64).contains(&generation) {
        return Err(1);
    }
    match generation {
        0 => stats.gc_collections[0] += 1,
        1 => stats.gc_collections[1] += 1,
        _ => stats.gc_collections[2] += 1,
    }
    let now = unsafe { bpf_ktime_get_ns() };
    begin_call::<{ counter::PENDING_GC }, _>(&PENDING_GC, pid_tgid, now)
}

#[inline(always)]
pub(crate) fn try_gc_done(regs: *const pt_regs, cookie: u64) -> Result<u32, u32> {
    let (pid_tgid, tgid, tid) = current_ids();
    // A collection that began before the probes were attached has no start.
    let started = end_call(&PENDING_GC, pid_tgid).ok_or(0u32)?;
    let stats = stats(tgid).ok_or(1u32)?;
    charge(tgid, tid, stats);
    let now = unsafe { bpf_ktime_get_ns() };
    stats.gc_ns += now.saturating_sub(started);
    if let Some(unreachable) = argument(regs, cookie)
        && (0..MAX_UNREACHABLE).contains(&unreachable)
    {
        stats.gc_unreachable_objects += unreachable as u64;
    }
    Ok(0)
}
