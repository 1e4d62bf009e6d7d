//! Following a set of processes and their descendants through a
//! [`Source`] for the length of a run: heap and RSS samples, allocation
//! sites now and then, and object censuses on a thread of their own (each
//! pauses its process; the samples go on meanwhile).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use log::debug;
use serde::{Deserialize, Serialize};

use crate::{
    cpython::heap::HeapCensus,
    model::{HeapBreakdown, ProcessInfo},
    sites::Site,
    top::source::Source,
};

/// How often the allocation sites of each process are read (cheap: no
/// pause, the observer's live attribution).
const SITES_INTERVAL: Duration = Duration::from_secs(2);
/// How often each process is censused (each census pauses it while its
/// heap is copied).
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);
/// Readings kept per process; beyond, every other one is dropped (the
/// first and the last stay), so that an hour-long run stays small.
const MAX_SAMPLES: usize = 4096;
const MAX_SNAPSHOTS: usize = 48;
/// Parents followed up from a process to find whether it descends from a
/// root.
const MAX_ANCESTRY: usize = 64;

/// One reading of a process's heap, `t` seconds into the run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub heap_bytes: u64,
    pub heap: HeapBreakdown,
    pub rss_bytes: u64,
}

/// Everything read of one process during the run.
#[derive(Clone, Debug)]
pub struct Recording {
    /// As last published.
    pub info: ProcessInfo,
    pub samples: Vec<Sample>,
    /// Allocation sites, heaviest first, with when they were read.
    pub sites: Vec<(f64, Vec<Site>)>,
    pub censuses: Vec<(f64, HeapCensus)>,
    /// Why no census could be taken, if none could.
    pub census_error: Option<String>,
}

/// Follows `roots` and every process descending from them.
pub struct Recorder<'a> {
    source: &'a Source,
    roots: Vec<u32>,
    started: Instant,
    /// Whether each pid seen descends from a root (decided once per pid).
    members: HashMap<u32, bool>,
    recordings: BTreeMap<u32, Recording>,
    alive: Vec<u32>,
    sites_due: Instant,
    censuses: Arc<CensusShelf>,
}

/// What the census thread shares with the recorder.
#[derive(Default)]
pub struct CensusShelf {
    /// The pids to census next round.
    wanted: Mutex<Vec<u32>>,
    taken: Mutex<HashMap<u32, Vec<(f64, HeapCensus)>>>,
    errors: Mutex<HashMap<u32, String>>,
    stop: AtomicBool,
}

impl<'a> Recorder<'a> {
    pub fn new(source: &'a Source, roots: Vec<u32>, started: Instant) -> Self {
        Self {
            source,
            roots,
            started,
            members: HashMap::new(),
            recordings: BTreeMap::new(),
            alive: Vec::new(),
            sites_due: started,
            censuses: Arc::default(),
        }
    }

    /// When the run started: the time base of every reading.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Reads the source once: a sample of every member it lists, and their
    /// sites when due. Errors of the source are logged, not fatal: one
    /// missed sample does not spoil a run.
    pub fn poll(&mut self) {
        let processes = match self.source.fetch() {
            Ok(processes) => processes,
            Err(e) => {
                debug!("reading the processes: {e:#}");
                return;
            }
        };
        let t = self.seconds();
        let mut alive = Vec::new();
        for info in processes {
            if !self.is_member(info.pid) {
                continue;
            }
            alive.push(info.pid);
            let sample = Sample {
                t,
                heap_bytes: info.heap_bytes,
                heap: info.heap,
                rss_bytes: info.rss_bytes,
            };
            match self.recordings.get_mut(&info.pid) {
                Some(recording) => {
                    recording.samples.push(sample);
                    thin(&mut recording.samples, MAX_SAMPLES);
                    recording.info = info;
                }
                None => {
                    self.recordings.insert(
                        info.pid,
                        Recording {
                            info,
                            samples: vec![sample],
                            sites: Vec::new(),
                            censuses: Vec::new(),
                            census_error: None,
                        },
                    );
                }
            }
        }
        if Instant::now() >= self.sites_due {
            self.sites_due = Instant::now() + SITES_INTERVAL;
            for &pid in &alive {
                match self.source.allocation_sites(pid) {
                    Ok(sites) => {
                        if let Some(recording) = self.recordings.get_mut(&pid) {
                            recording.sites.push((t, sites));
                            thin(&mut recording.sites, MAX_SNAPSHOTS);
                        }
                    }
                    Err(e) => debug!("sites of {pid}: {e:#}"),
                }
            }
        }
        *lock(&self.censuses.wanted) = alive.clone();
        self.alive = alive;
    }

    /// The members observed in the latest poll.
    pub fn alive(&self) -> &[u32] {
        &self.alive
    }

    /// Takes a census of each live member as soon as it is seen and then
    /// every `CENSUS_INTERVAL`, until `finish`; run it on a thread of its
    /// own.
    pub fn census_loop(source: &Source, shelf: &CensusShelf, started: Instant) {
        let mut due: HashMap<u32, Instant> = HashMap::new();
        while !shelf.stop.load(Ordering::Relaxed) {
            let wanted = lock(&shelf.wanted).clone();
            let now = Instant::now();
            let next = wanted
                .into_iter()
                .find(|pid| due.get(pid).is_none_or(|&at| at <= now));
            let Some(pid) = next else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            due.insert(pid, now + CENSUS_INTERVAL);
            match source.census(pid, Duration::ZERO, false, 0) {
                Ok(report) => {
                    let t = started.elapsed().as_secs_f64();
                    let mut taken = lock(&shelf.taken);
                    let censuses = taken.entry(pid).or_default();
                    censuses.push((t, report.census.heap));
                    thin(censuses, MAX_SNAPSHOTS);
                    lock(&shelf.errors).remove(&pid);
                }
                Err(e) => {
                    debug!("census of {pid}: {e:#}");
                    lock(&shelf.errors).insert(pid, format!("{e:#}"));
                }
            }
        }
    }

    pub fn census_shelf(&self) -> Arc<CensusShelf> {
        self.censuses.clone()
    }

    /// Stops the census thread (it ends after the census under way) and
    /// hands over every recording, by pid.
    pub fn finish(mut self) -> BTreeMap<u32, Recording> {
        self.censuses.stop.store(true, Ordering::Relaxed);
        let mut taken = std::mem::take(&mut *lock(&self.censuses.taken));
        let errors = std::mem::take(&mut *lock(&self.censuses.errors));
        for (pid, recording) in &mut self.recordings {
            recording.censuses = taken.remove(pid).unwrap_or_default();
            if recording.censuses.is_empty() {
                recording.census_error = errors.get(pid).cloned();
            }
        }
        self.recordings
    }

    fn is_member(&mut self, pid: u32) -> bool {
        if let Some(&member) = self.members.get(&pid) {
            return member;
        }
        let member = descends_from(pid, &self.roots);
        self.members.insert(pid, member);
        member
    }
}

impl CensusShelf {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether `pid` is one of `roots` or their descendant, by its parents in
/// procfs (a process that is gone already is not followed).
fn descends_from(pid: u32, roots: &[u32]) -> bool {
    let mut current = pid;
    for _ in 0..MAX_ANCESTRY {
        if roots.contains(&current) {
            return true;
        }
        if current <= 1 {
            return false;
        }
        let Ok(parent) = procfs::process::Process::new(current as i32)
            .and_then(|process| process.stat())
            .map(|stat| stat.ppid)
        else {
            return false;
        };
        current = parent.max(0) as u32;
    }
    false
}

/// Drops every other element but the first and the last once `items` has
/// more than `max`.
fn thin<T>(items: &mut Vec<T>, max: usize) {
    if items.len() <= max || items.len() < 3 {
        return;
    }
    let last = items.len() - 1;
    let mut index = 0;
    items.retain(|_| {
        let keep = index == 0 || index == last || index % 2 == 0;
        index += 1;
        keep
    });
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_the_first_and_the_last() {
        let mut items: Vec<u32> = (0..10).collect();
        thin(&mut items, 8);
        assert_eq!(items, [0, 2, 4, 6, 8, 9]);
        let mut few = vec![1, 2];
        thin(&mut few, 1);
        assert_eq!(few, [1, 2]);
    }

    #[test]
    fn this_process_descends_from_itself_and_its_parent() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(descends_from(me, &[me]));
        assert!(descends_from(me, &[parent]));
        assert!(!descends_from(me, &[u32::MAX - 1]));
    }
}
