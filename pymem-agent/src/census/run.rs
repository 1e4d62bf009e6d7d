//! One census, start to end, on blocking threads: pause, copy, resume,
//! then parse the copy while the process runs on.
use std::time::{Duration, Instant};

use super::{
    Census, PAUSED,
    engine::{self, CensusError},
    pause,
};
use crate::{
    discover::Binary,
    format,
    limits::{LimitReader, MemoryLimit},
};

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
    let limit = copy_limit(max_bytes, agent_memory_limit());
    // Refused before the pause, not after: a process too big is not
    // stopped at every request for it (an open `pymem top` asks often).
    engine::check_size(pid, limit.bytes).map_err(|e| {
        CensusError::Failed(format!(
            "copying the heap of pid {pid}: {e:#} ({}); not paused",
            limit.why
        ))
    })?;
    let copy_bytes = limit.bytes;
    let paused = pause::while_paused(pid, pause::STOP_TIMEOUT, move || {
        let image = engine::capture(pid, copy_bytes);
        (image, at_copy(pid))
    })
    .map_err(|e| CensusError::Failed(format!("pausing pid {pid}: {e}")))?;
    let (image, at_copy) = paused.value;
    let image = image.map_err(|e| {
        CensusError::Failed(format!(
            "copying the heap of pid {pid}: {e:#} ({})",
            limit.why
        ))
    })?;
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

/// A census peaks at about this many times the bytes it copies: the copy,
/// then per object its index, type, graph node and dominator entries
/// (measured: 3.9 GiB for a 1 GiB heap, about 5x for a 100 MiB one).
pub const PEAK_PER_COPIED_BYTE: u64 = 5;

/// The memory limit the agent itself runs under (its cgroup's, else the
/// host's), read now; None when it cannot be read.
pub fn agent_memory_limit() -> Option<MemoryLimit> {
    LimitReader::new().of_process(std::process::id())
}

/// The most one census may copy, and why, for the error of a heap above it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyLimit {
    pub bytes: u64,
    pub why: String,
}

/// `max_bytes`, or less where the agent's free memory would not hold the
/// census's peak: a census refused with a clear error, not an agent the
/// kernel kills for memory (a DaemonSet's limit) with every other
/// process's data.
pub fn copy_limit(max_bytes: u64, memory: Option<MemoryLimit>) -> CopyLimit {
    let by_option = CopyLimit {
        bytes: max_bytes,
        why: format!("--census-max-bytes {}", format::bytes(max_bytes)),
    };
    let Some((memory, usage)) = memory.and_then(|m| m.usage_bytes.map(|usage| (m, usage))) else {
        return by_option;
    };
    let free_bytes = memory.limit_bytes.saturating_sub(usage);
    let fits = free_bytes / PEAK_PER_COPIED_BYTE;
    if fits >= max_bytes {
        return by_option;
    }
    CopyLimit {
        bytes: fits,
        why: format!(
            "a census peaks at about {PEAK_PER_COPIED_BYTE}x its copy, and the agent has {} free under its memory limit ({})",
            format::bytes(free_bytes),
            memory.source
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A 64 GiB cgroup limit with `free_bytes` of it unused.
    fn memory(free_bytes: u64) -> Option<MemoryLimit> {
        Some(MemoryLimit {
            limit_bytes: 64 * GIB,
            cgroup_dir: Some("/sys/fs/cgroup/pymem".into()),
            source: "cgroup v2 memory.max /sys/fs/cgroup/pymem".into(),
            high_bytes: None,
            usage_bytes: Some(64 * GIB - free_bytes),
        })
    }

    #[test]
    fn the_option_limits_where_memory_is_plenty_or_unknown() {
        let unknown_usage = memory(0).map(|m| MemoryLimit {
            usage_bytes: None,
            ..m
        });
        for free in [None, unknown_usage, memory(64 * GIB)] {
            let limit = copy_limit(2 * GIB, free);
            assert_eq!(limit.bytes, 2 * GIB);
            assert_eq!(limit.why, "--census-max-bytes 2.0 GiB");
        }
    }

    #[test]
    fn free_memory_under_the_agents_limit_caps_the_copy_and_says_so() {
        let limit = copy_limit(2 * GIB, memory(GIB));
        assert_eq!(limit.bytes, GIB / PEAK_PER_COPIED_BYTE);
        assert!(limit.why.contains("1.0 GiB free"), "{}", limit.why);
        assert!(limit.why.contains("memory.max"), "{}", limit.why);
        assert_eq!(copy_limit(2 * GIB, memory(0)).bytes, 0);
    }

    #[test]
    fn the_agents_own_limit_is_read() {
        // Under no cgroup limit here: the host's free memory, which is
        // what /proc/meminfo's MemAvailable says.
        let memory = agent_memory_limit().expect("the agent's memory");
        assert!(
            memory
                .usage_bytes
                .is_some_and(|used| used < memory.limit_bytes),
            "{memory:?}"
        );
    }
}
