//! Inspections of new processes, off the loop: a bounded queue holding one
//! request per pid (the newest wins), served by a few threads of its own.
//!
//! Right after exec the loader may not have mapped libpython yet, so an
//! inspection is tried again for a few seconds; the retries wait in the
//! queue, not in a sleeping thread, so an exec storm costs queue entries,
//! not threads. When the queue is full a request is dropped and counted:
//! the next scan of /proc finds that process.
//!
//! Every request carries a ticket from the observer; a result whose ticket
//! is older than the pid's newest request is stale (a fork inspected
//! before the exec that followed it) and the observer drops it.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{Found, FoundBy};
use crate::discover::{self, Discoverer, Skip};

/// Requests waiting at most: far more than a host execs in the seconds a
/// retry lasts.
const MAX_PENDING: usize = 4096;

/// Threads serving the queue: inspections are short (the binary's analysis
/// is cached per inode), and this bounds what a storm can take.
const WORKERS: usize = 2;

/// Waits before each try after an exec: the loader maps libpython within
/// milliseconds, or seconds on a starved machine (about 5 s in all).
const RETRY_DELAYS_MS: [u64; 12] = [0, 10, 20, 40, 80, 150, 250, 400, 500, 1000, 1000, 1500];

/// One pid to inspect.
#[derive(Clone, Copy, Debug)]
struct Request {
    pid: u32,
    found_by: FoundBy,
    ticket: u64,
    /// Tries done so far.
    tries: usize,
    due: Instant,
}

#[derive(Default)]
struct Queue {
    /// Requests by pid: one each.
    pending: HashMap<u32, Request>,
    /// The same, ordered by when they are due.
    by_due: BTreeSet<(Instant, u64, u32)>,
    closed: bool,
}

impl Queue {
    fn insert(&mut self, request: Request) {
        if let Some(old) = self.pending.insert(request.pid, request) {
            self.by_due.remove(&(old.due, old.ticket, old.pid));
        }
        self.by_due
            .insert((request.due, request.ticket, request.pid));
    }

    /// The first request due by `now`, or how long until one is.
    fn take_due(&mut self, now: Instant) -> Result<Request, Option<Duration>> {
        let Some(&(due, ticket, pid)) = self.by_due.first() else {
            return Err(None);
        };
        if due > now {
            return Err(Some(due - now));
        }
        self.by_due.remove(&(due, ticket, pid));
        Ok(self
            .pending
            .remove(&pid)
            .expect("queued requests are pending"))
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker never panics holding the lock, but a poisoned queue is
        // still a queue.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The queue and its threads; dropping it stops them (a thread busy with
/// an inspection finishes it first).
pub(super) struct Inspections {
    shared: Arc<Shared>,
}

impl Inspections {
    pub(super) fn start(discoverer: Discoverer, found: mpsc::UnboundedSender<Found>) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        for n in 0..WORKERS {
            let (shared, discoverer, found) = (shared.clone(), discoverer.clone(), found.clone());
            std::thread::Builder::new()
                .name(format!("pymem-inspect-{n}"))
                .spawn(move || serve(&shared, &discoverer, &found))
                .expect("spawning an inspection thread");
        }
        Self { shared }
    }

    /// Asks for `pid` to be inspected; replaces a request of it still
    /// waiting. False when the queue is full and the request was dropped.
    pub(super) fn request(&self, pid: u32, found_by: FoundBy, ticket: u64) -> bool {
        let mut queue = self.shared.lock();
        if queue.pending.len() >= MAX_PENDING && !queue.pending.contains_key(&pid) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        queue.insert(Request {
            pid,
            found_by,
            ticket,
            tries: 0,
            due: Instant::now(),
        });
        drop(queue);
        self.shared.wake.notify_one();
        true
    }

    /// Requests dropped because the queue was full.
    pub(super) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Requests waiting now.
    pub(super) fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }
}

impl Drop for Inspections {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

fn serve(shared: &Shared, discoverer: &Discoverer, found: &mpsc::UnboundedSender<Found>) {
    loop {
        let request = {
            let mut queue = shared.lock();
            loop {
                if queue.closed {
                    return;
                }
                match queue.take_due(Instant::now()) {
                    Ok(request) => break request,
                    Err(None) => queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner()),
                    Err(Some(wait)) => {
                        queue = shared
                            .wake
                            .wait_timeout(queue, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        };
        let Some(result) = inspect(discoverer, request) else {
            let retry = Request {
                tries: request.tries + 1,
                due: Instant::now() + Duration::from_millis(RETRY_DELAYS_MS[request.tries + 1]),
                ..request
            };
            let mut queue = shared.lock();
            // A newer request of the pid replaces the retry.
            if !queue.pending.contains_key(&request.pid) {
                queue.insert(retry);
            }
            continue;
        };
        if found.send(result).is_err() {
            return;
        }
    }
}

/// One try: what was found, or `None` to try again later.
fn inspect(discoverer: &Discoverer, request: Request) -> Option<Found> {
    let Request {
        pid,
        found_by,
        ticket,
        tries,
        ..
    } = request;
    // A fork event names threads too.
    if found_by == FoundBy::Fork && !discover::is_process(pid) {
        return Some(Found::Skipped(pid, Skip::Gone, ticket));
    }
    match discoverer.inspect(pid) {
        Ok(process) => Some(Found::Python {
            process: Box::new(process),
            found_by,
            ticket,
        }),
        Err(Skip::NotYetMapped) if tries + 1 < RETRY_DELAYS_MS.len() => None,
        Err(skip) => Some(Found::Skipped(pid, skip, ticket)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pid: u32, ticket: u64, due: Instant) -> Request {
        Request {
            pid,
            found_by: FoundBy::Exec,
            ticket,
            tries: 0,
            due,
        }
    }

    #[test]
    fn one_request_per_pid_the_newest_and_in_due_order() {
        let now = Instant::now();
        let mut queue = Queue::default();
        queue.insert(request(7, 1, now));
        queue.insert(request(8, 2, now + Duration::from_millis(5)));
        queue.insert(request(7, 3, now + Duration::from_millis(1)));
        assert_eq!(queue.pending.len(), 2);
        assert_eq!(queue.by_due.len(), 2);
        assert_eq!(
            queue.take_due(now).unwrap_err(),
            Some(Duration::from_millis(1))
        );
        let later = now + Duration::from_millis(10);
        let first = queue.take_due(later).unwrap();
        assert_eq!((first.pid, first.ticket), (7, 3));
        assert_eq!(queue.take_due(later).unwrap().pid, 8);
        assert_eq!(queue.take_due(later).unwrap_err(), None);
    }

    /// A real process, inspected through the queue's own threads; a storm
    /// past the bound is dropped and counted, not queued.
    #[test]
    fn requests_are_served_and_a_storm_is_bounded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let inspections = Inspections::start(Discoverer::default(), tx);
        let me = std::process::id();
        assert!(inspections.request(me, FoundBy::Scan, 1));
        let found = rx.blocking_recv().unwrap();
        assert!(
            matches!(found, Found::Skipped(pid, Skip::NotPython(_), 1) if pid == me),
            "the test binary is not Python"
        );
        let mut accepted = 0;
        // Fill it with requests due in an hour, so that none is served.
        {
            let mut queue = inspections.shared.lock();
            let later = Instant::now() + Duration::from_secs(3600);
            for pid in 0..MAX_PENDING as u32 {
                queue.insert(request(1_000_000 + pid, 10, later));
            }
        }
        for pid in 0..10u32 {
            accepted += u32::from(inspections.request(2_000_000 + pid, FoundBy::Exec, 11));
        }
        assert_eq!(accepted, 0);
        assert_eq!(inspections.dropped(), 10);
        assert_eq!(inspections.pending(), MAX_PENDING);
        // A pid already waiting is replaced, not dropped (and, due now,
        // served: the count of waiting requests can only go down).
        assert!(inspections.request(1_000_000, FoundBy::Exec, 12));
        assert_eq!(inspections.dropped(), 10);
        assert!(inspections.pending() <= MAX_PENDING);
    }
}
