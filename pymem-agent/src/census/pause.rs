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
    ///
    /// A thread held by another pymem's pause (a second agent, `pymem run`
    /// beside a DaemonSet) is waited for, within `timeout`: such pauses
    /// last milliseconds. Any other tracer (a debugger, py-spy) is reported
    /// at once.
    pub fn stop(pid: u32, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::try_stop(pid, deadline) {
                Ok(pause) => return Ok(pause),
                Err(Failed::HeldByAnotherPause(reason)) => {
                    // Everything seized was let go, so the other pause can
                    // finish; a backoff that differs between agents keeps
                    // two of them from colliding again in step.
                    let backoff = contention_backoff();
                    if Instant::now() + backoff >= deadline {
                        return Err(reason);
                    }
                    std::thread::sleep(backoff);
                }
                Err(Failed::Other(reason)) => return Err(reason),
            }
        }
    }

    fn try_stop(pid: u32, deadline: Instant) -> Result<Self, Failed> {
        let mut pause = Self {
            pid,
            threads: BTreeMap::new(),
            stopped_at: Instant::now(),
        };
        for _ in 0..THREAD_ROUNDS {
            let new: Vec<i32> = threads_of(pid)
                .map_err(Failed::Other)?
                .into_iter()
                .filter(|tid| !pause.threads.contains_key(tid))
                .collect();
            if new.is_empty() {
                pause.stopped_at = Instant::now();
                return Ok(pause);
            }
            if pause.threads.len() + new.len() > MAX_THREADS {
                return Err(Failed::Other(format!("more than {MAX_THREADS} threads")));
            }
            let mut seized = Vec::with_capacity(new.len());
            let mut failure = None;
            for &tid in &new {
                match seize_and_interrupt(tid) {
                    Ok(()) => seized.push(tid),
                    Err(error) => {
                        failure = Some(seize_failure(tid, &error));
                        break;
                    }
                }
            }
            // Every seized thread is waited for even when one failed: only
            // a stopped tracee can be detached, so the retry finds none of
            // them still traced by this thread.
            for &tid in &seized {
                pause.threads.insert(tid, 0);
                pause.wait_for_stop(tid, deadline).map_err(Failed::Other)?;
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Err(Failed::Other(format!(
            "pid {pid} kept starting threads while being paused"
        )))
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

/// Why one attempt at a pause failed.
enum Failed {
    /// A thread is in another pymem's pause: worth waiting for.
    HeldByAnotherPause(String),
    Other(String),
}

/// The name of every pause thread, by which another pymem's pause is told
/// apart from a debugger's.
const PAUSE_THREAD: &str = "pymem-pause";

fn seize_failure(tid: i32, error: &io::Error) -> Failed {
    match tracer_of(tid).filter(|&t| t != 0) {
        Some(tracer) => {
            let reason = format!("thread {tid} is already traced by pid {tracer}");
            if thread_name(tracer).as_deref() == Some(PAUSE_THREAD) {
                Failed::HeldByAnotherPause(reason)
            } else {
                Failed::Other(reason)
            }
        }
        None => Failed::Other(format!("cannot ptrace thread {tid}: {error}")),
    }
}

/// `comm` of a thread (its id is what `TracerPid` names).
fn thread_name(tid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{tid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

/// 2 to 6 ms, varying between calls and agents.
fn contention_backoff() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 4_000;
    Duration::from_micros(2_000 + u64::from(jitter))
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
    /// CPU time of the pause thread: seizing, `work`, detaching.
    pub cpu: Duration,
}

/// Runs `work` while `pid` is paused, on a thread of its own (see the
/// module); if the pause fails, runs it anyway, unpaused, with the reason.
pub fn while_paused<T: Send + 'static>(
    pid: u32,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<Paused<T>> {
    let tracer = std::thread::Builder::new()
        .name(PAUSE_THREAD.into())
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
                cpu: super::run::thread_cpu_time(),
            }
        })?;
    tracer
        .join()
        .map_err(|_| io::Error::other("the pause thread panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::sync::mpsc;

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// Holds a pause of `pid` on a thread named `name` for `hold`; returns
    /// once the pause is in place.
    fn hold_on_a_thread(pid: u32, name: &str, hold: Duration) -> std::thread::JoinHandle<()> {
        let (held, is_held) = mpsc::channel();
        let holder = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let pause = Pause::stop(pid, STOP_TIMEOUT).unwrap();
                held.send(()).unwrap();
                std::thread::sleep(hold);
                drop(pause);
            })
            .unwrap();
        is_held.recv().unwrap();
        holder
    }

    fn gettid() -> u32 {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() as u32 }
    }

    #[test]
    fn a_pause_waits_for_another_pymem_pause_to_end() {
        let mut child = sleeper();
        let holder = hold_on_a_thread(child.id(), PAUSE_THREAD, Duration::from_millis(200));
        assert_ne!(tracer_of(child.id() as i32), Some(gettid()));
        let pause = Pause::stop(child.id(), STOP_TIMEOUT);
        let traced_by = tracer_of(child.id() as i32);
        let pause = pause.unwrap_or_else(|reason| panic!("not paused: {reason}"));
        assert_eq!(traced_by, Some(gettid()));
        assert_eq!(pause.threads(), 1);
        drop(pause);
        holder.join().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_debugger_holding_the_process_is_reported_without_waiting() {
        let mut child = sleeper();
        let holder = hold_on_a_thread(child.id(), "debugger", Duration::from_secs(3));
        let debugger = tracer_of(child.id() as i32).unwrap();
        let failed = Pause::stop(child.id(), STOP_TIMEOUT).err().unwrap();
        // Still held by the debugger: the pause gave up before it let go.
        assert_eq!(tracer_of(child.id() as i32), Some(debugger));
        assert_eq!(
            failed,
            format!("thread {} is already traced by pid {debugger}", child.id())
        );
        holder.join().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
