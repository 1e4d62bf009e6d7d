//! The kernel side's log records (aya-log), written on its rare error paths,
//! passed on to the agent's logger by a thread of their own.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::Ebpf;
use log::debug;

/// How long the thread sleeps between checks of `stop`.
const POLL_MS: i32 = 100;

pub(super) struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KernelLog {
    /// Starts forwarding; None (logged) when the object has no log buffer.
    /// Takes the log map out of `ebpf`.
    pub(super) fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let mut logger = match aya_log::EbpfLogger::init(ebpf) {
            Ok(logger) => logger,
            Err(e) => {
                debug!("no eBPF logger: {e}");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pymem-kernel-log".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: logger.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the fd lives as long as
                    // `logger`.
                    unsafe { libc::poll(&mut poll, 1, POLL_MS) };
                    logger.flush();
                }
            });
        match thread {
            Ok(thread) => Some(Self {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                debug!("no eBPF log thread: {e}");
                None
            }
        }
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
