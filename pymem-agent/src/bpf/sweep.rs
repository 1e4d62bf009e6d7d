//! Deleting what exited processes left in the kernel's maps, off the
//! observer's thread: the maps are walked one bpf syscall per key.
use std::{
    collections::HashSet,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use log::{debug, warn};

use super::maps::SweptMaps;

/// One worker thread; at most one sweep runs, and requests made meanwhile
/// are coalesced into the next one.
pub(super) struct Sweeper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The processes alive at the last request not yet started.
    request: Option<HashSet<u32>>,
    /// Processes tracked and not forgotten. Their entries are kept even
    /// when a request predates them.
    tracked: HashSet<u32>,
}

impl Sweeper {
    pub(super) fn spawn(maps: SweptMaps) -> Self {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pymem-sweep".into())
            .spawn(move || worker.run(maps));
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(e) => {
                warn!("no sweep thread ({e}): maps of exited processes are not swept");
                None
            }
        };
        Self { shared, thread }
    }

    pub(super) fn tracked(&self, pid: u32) {
        self.shared.lock().tracked.insert(pid);
    }

    pub(super) fn forgotten(&self, pid: u32) {
        self.shared.lock().tracked.remove(&pid);
    }

    /// Asks for a sweep of every process not `alive` (asked about the
    /// tracked ones) and returns at once.
    pub(super) fn request(&self, alive: impl Fn(u32) -> bool) {
        let mut state = self.shared.lock();
        let snapshot = state.tracked.iter().copied().filter(|&pid| alive(pid));
        state.request = Some(snapshot.collect());
        self.shared.wake.notify_one();
    }

    /// Stops the worker, abandoning a sweep in flight.
    pub(super) fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn next_request(&self) -> Option<HashSet<u32>> {
        let mut state = self.lock();
        loop {
            if self.stopping() {
                return None;
            }
            if let Some(alive) = state.request.take() {
                return Some(alive);
            }
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Of the processes found in a map, those to delete.
    fn dead(&self, alive: &HashSet<u32>, found: impl Iterator<Item = u32>) -> HashSet<u32> {
        let candidates: HashSet<u32> = found.filter(|pid| !alive.contains(pid)).collect();
        let state = self.lock();
        candidates
            .into_iter()
            .filter(|pid| !state.tracked.contains(pid))
            .collect()
    }

    fn run(&self, mut maps: SweptMaps) {
        while let Some(alive) = self.next_request() {
            for (name, map) in &mut maps.live {
                let keys: Vec<_> = map.keys().flatten().collect();
                let dead = self.dead(&alive, keys.iter().map(|key| key.tgid));
                let mut removed = 0;
                for key in keys.iter().filter(|key| dead.contains(&key.tgid)) {
                    if self.stopping() {
                        return;
                    }
                    removed += usize::from(map.remove(key).is_ok());
                }
                if removed > 0 {
                    debug!("swept {removed} entries of exited processes from {name}");
                }
            }
            let pids: Vec<u32> = maps.stats.keys().flatten().collect();
            for pid in self.dead(&alive, pids.into_iter()) {
                if self.stopping() {
                    return;
                }
                let _ = maps.stats.remove(&pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of processes neither alive at the request nor tracked since
    /// are deleted; a process tracked after the request keeps its own.
    #[test]
    fn dead_are_those_neither_alive_nor_tracked() {
        let shared = Shared::default();
        shared.lock().tracked.extend([1, 2]);
        let alive: HashSet<u32> = [1].into();
        shared.lock().tracked.insert(3);
        let dead = shared.dead(&alive, [1, 2, 3, 4, 4].into_iter());
        assert_eq!(dead, HashSet::from([4]));
    }

    /// Requests made while none has started are coalesced into one, the
    /// latest.
    #[test]
    fn requests_coalesce_into_the_latest() {
        let shared = Arc::new(Shared::default());
        let sweeper = Sweeper {
            shared: Arc::clone(&shared),
            thread: None,
        };
        sweeper.tracked(1);
        sweeper.tracked(2);
        sweeper.request(|pid| pid == 1);
        sweeper.request(|pid| pid == 2);
        assert_eq!(shared.next_request(), Some(HashSet::from([2])));
        shared.stop.store(true, Ordering::Relaxed);
        assert_eq!(shared.next_request(), None);
    }
}
