//! The entry probe of every per-process, budgeted hook (libc allocations of
//! the interpreter, extension buffers). One program for all of them, told
//! apart by the attach cookie, so that a process costs one multi-uprobe link
//! for its entries: links are what the kernel tears down slowly, one grace
//! period after another. The garbage collector's probes are among them.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_attach_cookie, macros::uprobe, programs::ProbeContext,
};
use pymem_common::cookie;

use super::{extension, gc, raw};

#[uprobe]
pub fn budgeted_entry(ctx: ProbeContext) -> u32 {
    match try_budgeted_entry(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_budgeted_entry(ctx: &ProbeContext) -> Result<u32, u32> {
    let attached = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    match cookie::kind(attached) {
        cookie::MALLOC => raw::try_raw_malloc(ctx),
        cookie::CALLOC => raw::try_raw_calloc(ctx),
        cookie::REALLOC => raw::try_raw_realloc(ctx),
        cookie::FREE => raw::try_raw_free(ctx),
        cookie::TRACK => extension::try_ext_track(ctx),
        cookie::UNTRACK => extension::try_ext_untrack(ctx),
        cookie::GC_START => gc::try_gc_start(ctx.regs, attached),
        cookie::GC_DONE => gc::try_gc_done(ctx.regs, attached),
        _ => Err(1),
    }
}
