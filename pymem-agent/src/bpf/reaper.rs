//! Threads that drop detached links: closing a uprobe waits for RCU grace
//! periods, which must not stall the observer.
use std::sync::{Arc, Mutex, mpsc};

use log::warn;

/// Threads closing detached links: multi-uprobe links close in parallel
/// (each waits for its own grace periods), perf-event ones queue in the
/// kernel anyway.
const DETACH_THREADS: usize = 8;

/// Something whose drop detaches probes, for the detach threads.
pub(super) type Detached = Box<dyn Send>;

pub(super) struct Reaper {
    sender: Option<mpsc::Sender<Detached>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Reaper {
    pub(super) fn spawn() -> Self {
        let (sender, receiver) = mpsc::channel::<Detached>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut threads = Vec::new();
        for i in 0..DETACH_THREADS {
            let receiver = Arc::clone(&receiver);
            let spawned = std::thread::Builder::new()
                .name(format!("pymem-detach-{i}"))
                .spawn(move || {
                    loop {
                        let next = receiver.lock().map(|r| r.recv());
                        match next {
                            Ok(Ok(detached)) => drop(detached),
                            _ => break,
                        }
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => warn!("no detach thread ({e})"),
            }
        }
        if threads.is_empty() {
            warn!("detaching inline");
        }
        Self {
            sender: (!threads.is_empty()).then_some(sender),
            threads,
        }
    }

    pub(super) fn detach(&self, detached: Detached) {
        match &self.sender {
            Some(sender) => {
                if let Err(mpsc::SendError(detached)) = sender.send(detached) {
                    drop(detached);
                }
            }
            None => drop(detached),
        }
    }

    /// Waits until everything handed over is closed.
    pub(super) fn finish(&mut self) {
        self.sender = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
