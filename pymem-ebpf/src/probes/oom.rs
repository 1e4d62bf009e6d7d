//! OOM kills: the kernel's OOM killer marking its victim, so the agent can
//! keep a post-mortem of an observed process before its exit drops it.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use pymem_common::event_kind;

use crate::maps::{current_ids, emit, oom_victim_anon_rss_offset, oom_victim_pid_offset};

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    match try_oom_mark_victim(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// Runs in the context of the task whose allocation failed, not the
/// victim's: the victim is the record's `pid`. Every victim is reported
/// (the agent decides whether it observed it); OOM kills are rare.
fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<u32, u32> {
    let victim: i32 = unsafe { ctx.read_at(oom_victim_pid_offset()) }.map_err(|_| 1u32)?;
    // The record counts kB; older kernels record only the pid.
    let anon_rss_kib = match oom_victim_anon_rss_offset() {
        Some(offset) => unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0),
        None => 0,
    };
    let (_, _, tid) = current_ids();
    let sent = emit(
        event_kind::OOM_KILL,
        victim as u32,
        tid,
        0,
        anon_rss_kib.saturating_mul(1024),
        0,
    );
    if !sent {
        // Counted as a lost event too; the log says whose post-mortem it was.
        warn!(
            ctx,
            "event ring buffer full: the OOM kill of pid {} is not reported", victim
        );
    }
    Ok(0)
}
