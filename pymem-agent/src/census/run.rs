//! One census, start to end, on blocking threads: pause, copy, resume,
//! then parse the copy while the process runs on.
use std::time::{Duration, Instant};

use super::{
    Census, PAUSED,
    engine::{self, CensusError},
    pause,
};
use crate::discover::Binary;

/// Pauses `pid`, copies at most `max_bytes` of its heap, calls `at_copy`
/// (still paused), resumes it and counts the copy's objects by type. Blocks
/// for the whole census; never call it on the observer's loop. A process
/// that cannot be paused (another tracer holds it) is copied while it runs
/// and its census marked torn.
pub fn take<R: Send + 'static>(
    pid: u32,
    binary: &Binary,
    max_bytes: u64,
    at_copy: impl FnOnce(u32) -> R + Send + 'static,
) -> Result<(Census, R), CensusError> {
    let target = engine::CensusTarget::for_process(pid, binary)
        .map_err(|e| CensusError::Unsupported(format!("{e:#}")))?;
    let taken_at = super::unix_seconds_now();
    let cpu_before = thread_cpu_time();
    let paused = pause::while_paused(pid, pause::STOP_TIMEOUT, move || {
        let image = engine::capture(pid, max_bytes);
        (image, at_copy(pid))
    })
    .map_err(|e| CensusError::Failed(format!("pausing pid {pid}: {e}")))?;
    let (image, at_copy) = paused.value;
    let image =
        image.map_err(|e| CensusError::Failed(format!("copying the heap of pid {pid}: {e:#}")))?;
    let consistency = match &paused.pause {
        Ok(()) => PAUSED.to_string(),
        Err(reason) => format!("may be torn: {reason}"),
    };
    let parse_started = Instant::now();
    let heap = engine::take_census(&image, &target)?;
    // The pause thread's (seize, copy, detach) and this one's (parse).
    let cpu = paused.cpu + thread_cpu_time().saturating_sub(cpu_before);
    let census = Census {
        pid,
        taken_at,
        consistency,
        pause_seconds: paused.held.as_secs_f64(),
        copy_seconds: paused.work.as_secs_f64(),
        parse_seconds: parse_started.elapsed().as_secs_f64(),
        cpu_seconds: cpu.as_secs_f64(),
        copied_bytes: image.copied_bytes(),
        heap,
    };
    Ok((census, at_copy))
}

/// Hands the memory a census used (the copy, its maps, the graph) back to
/// the system: glibc keeps freed memory in its arenas otherwise, and an
/// agent that censused fifty processes at start would stay hundreds of MiB
/// big.
pub fn return_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has used so far (zero if the clock cannot
/// be read).
pub fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only `now`.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}
