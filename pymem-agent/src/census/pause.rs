//! Holding a process still while its memory is copied: every thread seized
//! and interrupted with ptrace, then detached.
//!
//! ptrace belongs to the tracer *thread*: seize, wait and detach must all
//! run on the thread that created the [`Pause`]. [`while_paused`] runs the
//! whole pause on a thread of its own, so that even a detach that fails
//! (a thread that never stopped) is undone by the kernel when that thread
//! exits, as it is when the agent is killed mid-pause.
use std::{
    collections::BTreeMap,
    io,
    time::{Duration, Instant},
};

/// How long every thread gets to stop before the pause is given up.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds of re-reading `/proc/PID/task` for threads started meanwhile.
const THREAD_ROUNDS: usize = 4;
/// Threads seized at most (a hostile process may spawn without end).
const MAX_THREADS: usize = 4096;

/// A process whose every thread is in a ptrace stop; resumed on drop.
pub struct Pause {
    pid: u32,
    /// Seized threads and the signal each stopped with, to deliver on
    /// detach (0: none).
    threads: BTreeMap<i32, i32>,
    stopped_at: Instant,
}

impl Pause {
    /// Seizes and stops every thread of `pid` within `timeout`; on failure
    /// every thread seized is let go and the reason returned.
    pub fn stop(pid: u32, timeout: Duration) -> Result<Self, String> {
        let mut pause = Self {
            pid,
            threads: BTreeMap::new(),
            stopped_at: Instant::now(),
        };
        let deadline = Instant::now() + timeout;
        for _ in 0..THREAD_ROUNDS {
            let new: Vec<i32> = threads_of(pid)?
                .into_iter()
                .filter(|tid| !pause.threads.contains_key(tid))
                .collect();
            if new.is_empty() {
                pause.stopped_at = Instant::now();
                return Ok(pause);
            }
            if pause.threads.len() + new.len() > MAX_THREADS {
                return Err(format!("more than {MAX_THREADS} threads"));
            }
            for &tid in &new {
                seize_and_interrupt(tid).map_err(|e| seize_failure(tid, &e))?;
                pause.threads.insert(tid, 0);
            }
            for &tid in &new {
                pause.wait_for_stop(tid, deadline)?;
            }
        }
        Err(format!(
            "pid {pid} kept starting threads while being paused"
        ))
    }

    /// Seconds since every thread stopped.
    pub fn held_for(&self) -> Duration {
        self.stopped_at.elapsed()
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Waits for `tid`'s stop; a thread that exits meanwhile is forgotten.
    fn wait_for_stop(&mut self, tid: i32, deadline: Instant) -> Result<(), String> {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes only `status`.
            let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
            if waited == tid {
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    self.threads.remove(&tid);
                    return Ok(());
                }
                if libc::WIFSTOPPED(status) {
                    let event = (status >> 16) & 0xff;
                    let signal = libc::WSTOPSIG(status);
                    // PTRACE_EVENT_STOP is our interrupt (or a group stop);
                    // anything else is a signal to hand back on detach.
                    if event != libc::PTRACE_EVENT_STOP {
                        self.threads.insert(tid, signal);
                    }
                    return Ok(());
                }
            } else if waited < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::ECHILD) {
                    // Gone (reaped elsewhere or never ours to wait for).
                    self.threads.remove(&tid);
                    return Ok(());
                }
                return Err(format!("waiting for thread {tid} to stop: {error}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "thread {tid} of pid {} did not stop within the pause timeout",
                    self.pid
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        for (&tid, &signal) in &self.threads {
            // SAFETY: PTRACE_DETACH of a tracee of this thread; a thread
            // still running (it never stopped) fails with ESRCH and is
            // detached by the kernel when this tracer thread exits.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_DETACH,
                    tid,
                    std::ptr::null_mut::<libc::c_void>(),
                    signal as libc::c_long,
                );
            }
        }
    }
}

fn seize_and_interrupt(tid: i32) -> io::Result<()> {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace requests on a tid with null address and data.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, on a thread this thread now traces.
    if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn seize_failure(tid: i32, error: &io::Error) -> String {
    let traced_by = tracer_of(tid).filter(|&t| t != 0);
    match traced_by {
        Some(tracer) => format!("thread {tid} is already traced by pid {tracer}"),
        None => format!("cannot ptrace thread {tid}: {error}"),
    }
}

/// `TracerPid` of a thread.
fn tracer_of(tid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn threads_of(pid: u32) -> Result<Vec<i32>, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("listing the threads of pid {pid}: {e}"))?;
    Ok(tasks
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .take(MAX_THREADS + 1)
        .collect())
}

/// What [`while_paused`] did.
pub struct Paused<T> {
    pub value: T,
    /// `Err(reason)` when the process could not be paused and `work` ran
    /// while it kept running.
    pub pause: Result<(), String>,
    /// From the first thread seized to the last detached (zero unpaused).
    pub held: Duration,
    /// How long `work` took.
    pub work: Duration,
}

/// Runs `work` while `pid` is paused, on a thread of its own (see the
/// module); if the pause fails, runs it anyway, unpaused, with the reason.
pub fn while_paused<T: Send + 'static>(
    pid: u32,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<Paused<T>> {
    let tracer = std::thread::Builder::new()
        .name("pymem-pause".into())
        .spawn(move || {
            let started = Instant::now();
            let pause = Pause::stop(pid, timeout);
            let stop_took = started.elapsed();
            let work_started = Instant::now();
            let value = work();
            let work_took = work_started.elapsed();
            let (pause, held) = match pause {
                Ok(pause) => {
                    drop(pause);
                    (Ok(()), stop_took + work_started.elapsed())
                }
                Err(reason) => (Err(reason), Duration::ZERO),
            };
            Paused {
                value,
                pause,
                held,
                work: work_took,
            }
        })?;
    tracer
        .join()
        .map_err(|_| io::Error::other("the pause thread panicked"))
}
