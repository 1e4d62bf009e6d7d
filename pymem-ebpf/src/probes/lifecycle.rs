//! Process lifecycle: exec, fork and exit, so the agent finds new Python
//! processes within milliseconds and drops exited ones.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use pymem_common::event_kind;

use crate::maps::{TRACKED, current_ids, emit, fork_child_pid_offset};

#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    match try_process_exec(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_process_exec(_ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    emit(event_kind::EXEC, tgid, tid, 0, 0, 0);
    Ok(0)
}

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    match try_process_exit(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_process_exit(_ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    // Threads exit too; only the group leader's exit ends the process.
    if tgid != tid || unsafe { TRACKED.get(tgid) }.is_none() {
        return Ok(0);
    }
    emit(event_kind::EXIT, tgid, tid, 0, 0, 0);
    Ok(0)
}

#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    match try_process_fork(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// Forked Python children (multiprocessing, gunicorn workers) never exec:
/// report them when the parent is observed. Threads are filtered in userspace.
fn try_process_fork(ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tgid, tid) = current_ids();
    if unsafe { TRACKED.get(tgid) }.is_none() {
        return Ok(0);
    }
    let child: i32 = unsafe { ctx.read_at(fork_child_pid_offset()) }.map_err(|_| 1u32)?;
    emit(event_kind::FORK, child as u32, tid, tgid as u64, 0, 0);
    Ok(0)
}
