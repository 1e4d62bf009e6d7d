//! Deleting what exited processes left in the kernel's maps, and the
//! stacks no observed process refers to any more, off the observer's
//! thread: the maps are walked one bpf syscall per key.
use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use log::{debug, warn};
use pymem_common::names::map;

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
    /// Entries of each swept map after its last sweep.
    entries: Mutex<BTreeMap<&'static str, usize>>,
}

#[derive(Default)]
struct State {
    /// The processes alive at the last request not yet started.
    request: Option<HashSet<u32>>,
    /// The stack ids observed processes refer to, at the last request of a
    /// stack sweep not yet started.
    stacks_in_use: Option<HashSet<u64>>,
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

    /// Asks for the stacks nobody refers to to be deleted (those still
    /// unreferenced at the next request too: a stack captured just now may
    /// not have reached the observer yet) and returns at once.
    pub(super) fn prune_stacks(&self, in_use: HashSet<u64>) {
        self.shared.lock().stacks_in_use = Some(in_use);
        self.shared.wake.notify_one();
    }

    /// Entries of each swept map after its last sweep: how full the
    /// kernel's maps stay.
    pub(super) fn entries(&self) -> BTreeMap<&'static str, usize> {
        self.shared
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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

    fn record_entries(&self, map: &'static str, entries: usize) {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(map, entries);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn next_request(&self) -> Option<Work> {
        let mut state = self.lock();
        loop {
            if self.stopping() {
                return None;
            }
            if state.request.is_some() || state.stacks_in_use.is_some() {
                return Some(Work {
                    alive: state.request.take(),
                    stacks_in_use: state.stacks_in_use.take(),
                });
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
        let mut unreferenced = HashSet::new();
        while let Some(work) = self.next_request() {
            if let Some(in_use) = work.stacks_in_use {
                let found: Vec<u64> = maps.stacks.keys().flatten().collect();
                let stale = stale_stacks(&found, &in_use, &mut unreferenced);
                let mut removed = 0;
                for id in &stale {
                    if self.stopping() {
                        return;
                    }
                    removed += usize::from(maps.stacks.remove(id).is_ok());
                }
                if removed > 0 {
                    debug!(
                        "pruned {removed} of {} stacks nobody refers to",
                        found.len()
                    );
                }
                self.record_entries(map::STACKS, found.len() - removed);
            }
            let Some(alive) = work.alive else { continue };
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
                self.record_entries(name, keys.len() - removed);
            }
            let pids: Vec<u32> = maps.stats.keys().flatten().collect();
            let mut left = pids.len();
            for pid in self.dead(&alive, pids.into_iter()) {
                if self.stopping() {
                    return;
                }
                left -= usize::from(maps.stats.remove(&pid).is_ok());
            }
            self.record_entries(map::PROC_STATS, left);
        }
    }
}

/// What one wake-up of the worker does.
#[derive(Debug, PartialEq, Eq)]
struct Work {
    alive: Option<HashSet<u32>>,
    stacks_in_use: Option<HashSet<u64>>,
}

/// Of the stacks `found`, those unreferenced now and at the previous
/// prune (`unreferenced`, updated to those unreferenced for the first
/// time now).
fn stale_stacks(found: &[u64], in_use: &HashSet<u64>, unreferenced: &mut HashSet<u64>) -> Vec<u64> {
    let (stale, fresh): (Vec<u64>, Vec<u64>) = found
        .iter()
        .copied()
        .filter(|id| !in_use.contains(id))
        .partition(|id| unreferenced.contains(id));
    *unreferenced = fresh.into_iter().collect();
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack is deleted only when two prunes in a row find nobody
    /// refers to it: one captured since the last prune is spared once.
    #[test]
    fn stacks_go_when_unreferenced_twice_in_a_row() {
        let mut unreferenced = HashSet::new();
        let in_use: HashSet<u64> = [1].into();
        assert!(stale_stacks(&[1, 2, 3], &in_use, &mut unreferenced).is_empty());
        let in_use: HashSet<u64> = [1, 3].into();
        assert_eq!(stale_stacks(&[1, 2, 3, 4], &in_use, &mut unreferenced), [2]);
        assert_eq!(unreferenced, HashSet::from([4]));
        assert_eq!(stale_stacks(&[1, 3, 4], &in_use, &mut unreferenced), [4]);
    }

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
        assert_eq!(
            shared.next_request(),
            Some(Work {
                alive: Some(HashSet::from([2])),
                stacks_in_use: None
            })
        );
        shared.stop.store(true, Ordering::Relaxed);
        assert_eq!(shared.next_request(), None);
    }
}
