//! Which censuses run when: the observer's bookkeeping of requests,
//! waiters, the agent-wide concurrency limit, the pace of the censuses
//! nobody waits for, and each process's last two censuses. No I/O here: it
//! hands back [`CensusJob`]s for the observer to run on blocking threads,
//! and takes their [`CensusDone`]s back.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use pymem_common::ProcStats;
use tokio::sync::oneshot;

use super::{Census, engine::CensusError, run};
use crate::discover::Binary;

/// Defaults of the census options (`pymem agent --census-*`).
pub const MAX_BYTES: u64 = 2 << 30;
pub const CONCURRENCY: usize = 1;
/// Share of one CPU, in percent, that censuses nobody waits for may take.
pub const BACKGROUND_CPU_PERCENT: u32 = 25;
/// Censuses kept per process: the latest, and the one growth is measured
/// from.
const KEPT: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CensusConfig {
    /// Automatic censuses of leak-suspected processes this often; None =
    /// only on demand.
    pub interval: Option<Duration>,
    /// Censuses running at once, agent-wide (each pauses its process and
    /// holds a copy of its heap).
    pub concurrency: usize,
    /// Most bytes one census copies out of a process.
    pub max_bytes: u64,
    /// `pymem_objects`/`pymem_object_bytes` for each process's N heaviest
    /// types; 0 = none.
    pub type_metrics: usize,
    /// A census of each process found older than its observation, for its
    /// heap baseline.
    pub baseline: bool,
    /// Censuses nobody waits for (baselines, automatic ones) start only as
    /// often as keeps all censuses under this share of one CPU, in percent
    /// (100: back to back). An agent that finds 500 processes running
    /// censuses them over a minute or two instead of a core for 15 s.
    pub background_cpu_percent: u32,
}

impl Default for CensusConfig {
    fn default() -> Self {
        Self {
            interval: None,
            concurrency: CONCURRENCY,
            max_bytes: MAX_BYTES,
            type_metrics: 0,
            baseline: true,
            background_cpu_percent: BACKGROUND_CPU_PERCENT,
        }
    }
}

/// A census for a requester: the one asked for and the one before it.
#[derive(Clone, Debug)]
pub struct CensusAnswer {
    pub latest: Arc<Census>,
    pub previous: Option<Arc<Census>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CensusFailure {
    NotObserved,
    /// The engine cannot read this process's build (kept for the process).
    Unsupported(String),
    /// This census failed; another may work.
    Failed(String),
}

pub type CensusReply = oneshot::Sender<Result<CensusAnswer, CensusFailure>>;

/// Which queue a census waits in.
#[derive(Clone, Copy)]
enum Queue {
    Asked,
    Background,
}

/// A census to run off the loop, of the process `target` describes (its
/// interpreter binary; the bookkeeping does not look into it).
pub struct CensusJob<T = Binary> {
    pub pid: u32,
    target: T,
    pub max_bytes: u64,
}

impl CensusJob {
    /// Runs the census (blocking: pause, copy, parse). `counters` reads the
    /// process's kernel counters; it is called right after the copy, while
    /// the process is still paused, so that they and the copy agree.
    pub fn run(self, counters: impl FnOnce(u32) -> ProcStats + Send + 'static) -> CensusDone {
        let started = Instant::now();
        let cpu_before = run::thread_cpu_time();
        let (result, counters_at_copy) =
            match run::take(self.pid, &self.target, self.max_bytes, counters) {
                Ok((census, counters)) => (Ok(census), Some(counters)),
                Err(e) => (Err(e), None),
            };
        run::return_memory();
        let cpu = match &result {
            Ok(census) => Duration::from_secs_f64(census.cpu_seconds),
            // Only this thread's part of a census that failed.
            Err(_) => run::thread_cpu_time().saturating_sub(cpu_before),
        };
        CensusDone {
            pid: self.pid,
            started,
            cpu,
            result,
            counters_at_copy,
        }
    }
}

/// What a job found.
pub struct CensusDone {
    pub pid: u32,
    /// When the job started: a process observed since then is another one
    /// that reuses the pid.
    pub started: Instant,
    /// CPU time the census took: its pace, which a loaded node's wall
    /// time would overstate.
    pub cpu: Duration,
    pub result: Result<Census, CensusError>,
    /// The process's kernel counters as they were when its heap was copied.
    pub counters_at_copy: Option<ProcStats>,
}

#[derive(Default)]
struct ProcessCensuses {
    /// Oldest first, at most `KEPT`.
    recent: VecDeque<Arc<Census>>,
    unsupported: Option<String>,
    /// Each with the oldest start of a census it accepts (it asked at a
    /// time, for a census no older than its `max_age`).
    waiters: Vec<(CensusReply, Instant)>,
    /// Queued or running.
    pending: bool,
    last_started: Option<Instant>,
}

impl ProcessCensuses {
    fn answer(&self) -> Option<CensusAnswer> {
        let latest = self.recent.back()?.clone();
        let previous = self
            .recent
            .len()
            .checked_sub(2)
            .map(|i| self.recent[i].clone());
        Some(CensusAnswer { latest, previous })
    }
}

pub struct CensusStage<T = Binary> {
    config: CensusConfig,
    running: usize,
    /// Pids whose censuses somebody waits for, first come first served:
    /// they go before the background ones, and are not paced.
    asked: VecDeque<(u32, T)>,
    /// Pids of censuses nobody waits for, started one at a time no sooner
    /// than `background_after`.
    background: VecDeque<(u32, T)>,
    /// The earliest start of the next background census: the time the
    /// last census took, stretched to `background_cpu_percent`.
    background_after: Option<Instant>,
    /// A wake-up at `background_after` was handed out and has not come.
    wakeup_pending: bool,
    processes: HashMap<u32, ProcessCensuses>,
    /// Processes whose waiters need a census that starts after the one
    /// under way: queued again when it ends.
    again: HashMap<u32, T>,
}

impl<T: Clone> CensusStage<T> {
    pub fn new(config: CensusConfig) -> Self {
        Self {
            config,
            running: 0,
            asked: VecDeque::new(),
            background: VecDeque::new(),
            background_after: None,
            wakeup_pending: false,
            processes: HashMap::new(),
            again: HashMap::new(),
        }
    }

    pub fn config(&self) -> &CensusConfig {
        &self.config
    }

    /// A census of `pid` no older than `max_age` for `reply`: the latest
    /// if recent enough, else the one under way, else a new one.
    pub fn request(
        &mut self,
        pid: u32,
        target: &T,
        max_age: Duration,
        reply: CensusReply,
    ) -> Option<CensusJob<T>> {
        let process = self.processes.entry(pid).or_default();
        if let Some(reason) = &process.unsupported {
            let _ = reply.send(Err(CensusFailure::Unsupported(reason.clone())));
            return None;
        }
        let recent = process.recent.back().is_some_and(|latest| {
            super::unix_seconds_now() - latest.taken_at <= max_age.as_secs_f64()
        });
        if recent && !max_age.is_zero() {
            let _ = reply.send(Ok(process.answer().expect("a latest census")));
            return None;
        }
        let oldest = Instant::now()
            .checked_sub(max_age)
            .unwrap_or_else(Instant::now);
        process.waiters.push((reply, oldest));
        if process.pending {
            // Queued in the background: not begun, so it answers this
            // request, which makes it an asked one.
            match self
                .background
                .iter()
                .position(|(queued, _)| *queued == pid)
            {
                Some(at) => self.asked.extend(self.background.remove(at)),
                None => {
                    self.again.insert(pid, target.clone());
                }
            }
            return self.next_job();
        }
        self.enqueue(pid, target, Queue::Asked)
    }

    /// An automatic census of a leak-suspected process, if one is due.
    pub fn maybe_automatic(&mut self, pid: u32, target: &T) -> Option<CensusJob<T>> {
        let interval = self.config.interval?;
        let process = self.processes.entry(pid).or_default();
        let due = process.unsupported.is_none()
            && !process.pending
            && process.last_started.is_none_or(|t| t.elapsed() >= interval);
        if !due {
            return None;
        }
        debug!("automatic census of leak-suspected pid {pid}");
        self.enqueue(pid, target, Queue::Background)
    }

    /// A census measuring what a process older than its observation held
    /// before pymem attached (its heap baseline), unless one is under way
    /// or the build cannot be censused.
    pub fn baseline(&mut self, pid: u32, target: &T) -> Option<CensusJob<T>> {
        let process = self.processes.entry(pid).or_default();
        if process.unsupported.is_some() || process.pending {
            return None;
        }
        debug!("baseline census of pid {pid}");
        self.enqueue(pid, target, Queue::Background)
    }

    fn enqueue(&mut self, pid: u32, target: &T, queue: Queue) -> Option<CensusJob<T>> {
        let process = self.processes.entry(pid).or_default();
        if process.pending {
            return None;
        }
        process.pending = true;
        match queue {
            Queue::Asked => self.asked.push_back((pid, target.clone())),
            Queue::Background => self.background.push_back((pid, target.clone())),
        }
        self.next_job()
    }

    /// Censuses queued (asked for or in the background), not yet running.
    pub fn queued(&self) -> usize {
        self.asked.len() + self.background.len()
    }

    /// Fewer censuses run than `concurrency` allows (0 counts as 1).
    fn slot_free(&self) -> bool {
        self.running < self.config.concurrency.max(1)
    }

    /// When to call [`Self::woken`]: the background census that waits only
    /// for its pace, once per such wait.
    pub fn take_wakeup(&mut self) -> Option<Instant> {
        let at = self.background_after?;
        let waits = !self.wakeup_pending
            && self.asked.is_empty()
            && !self.background.is_empty()
            && self.slot_free()
            && at > Instant::now();
        waits.then(|| {
            self.wakeup_pending = true;
            at
        })
    }

    /// The wake-up of [`Self::take_wakeup`] came: the next census, if due.
    pub fn woken(&mut self) -> Option<CensusJob<T>> {
        self.wakeup_pending = false;
        self.next_job()
    }

    /// The next queued census, if a slot is free: an asked one first, else
    /// a background one whose pace allows it.
    fn next_job(&mut self) -> Option<CensusJob<T>> {
        if !self.slot_free() {
            return None;
        }
        let (pid, target) = match self.asked.pop_front() {
            Some(next) => next,
            None => {
                if self.background_after.is_some_and(|at| at > Instant::now()) {
                    return None;
                }
                self.background.pop_front()?
            }
        };
        self.running += 1;
        if let Some(process) = self.processes.get_mut(&pid) {
            process.last_started = Some(Instant::now());
        }
        Some(CensusJob {
            pid,
            target,
            max_bytes: self.config.max_bytes,
        })
    }

    /// A census finished: keeps it, answers its waiters, and starts the
    /// next queued one, if any.
    pub fn finished(&mut self, done: CensusDone) -> Option<CensusJob<T>> {
        self.running = self.running.saturating_sub(1);
        self.pace_after(done.cpu);
        let pid = done.pid;
        // Forgotten meanwhile (the process exited): nobody waits.
        if let Some(process) = self.processes.get_mut(&pid) {
            process.pending = false;
            // Waiters that asked after this census began (a fresh one while
            // another was under way) wait for the next.
            let (mut waiters, mut later): (Vec<_>, Vec<_>) = std::mem::take(&mut process.waiters)
                .into_iter()
                .partition(|(_, oldest)| done.started >= *oldest);
            let answer = match done.result {
                Ok(census) => {
                    info!(
                        "census of pid {pid}: {} objects of {} types ({}), paused {:.3} s, copied {} bytes in {:.3} s, parsed in {:.3} s, {:.3} s of CPU",
                        census.heap.objects,
                        census.heap.types.len(),
                        census.consistency,
                        census.pause_seconds,
                        census.copied_bytes,
                        census.copy_seconds,
                        census.parse_seconds,
                        census.cpu_seconds
                    );
                    process.recent.push_back(Arc::new(census));
                    while process.recent.len() > KEPT {
                        process.recent.pop_front();
                    }
                    Ok(process.answer().expect("a latest census"))
                }
                Err(CensusError::Unsupported(reason)) => {
                    warn!("no object census of pid {pid}: {reason}");
                    waiters.extend(std::mem::take(&mut later));
                    process.unsupported = Some(reason.clone());
                    Err(CensusFailure::Unsupported(reason))
                }
                Err(CensusError::Failed(reason)) => {
                    warn!("object census of pid {pid} failed: {reason}");
                    Err(CensusFailure::Failed(reason))
                }
            };
            for (waiter, _) in waiters {
                let _ = waiter.send(answer.clone());
            }
            process.waiters = later;
            let again = self.again.remove(&pid);
            if !process.waiters.is_empty()
                && let Some(target) = again
            {
                process.pending = true;
                self.asked.push_back((pid, target));
            }
        }
        self.next_job()
    }

    /// A census took `took` of CPU (the pause, the copy, the parse): the
    /// next background one waits long enough for all of them
    /// to stay within `background_cpu_percent` of one CPU.
    fn pace_after(&mut self, took: Duration) {
        let percent = self.config.background_cpu_percent.clamp(1, 100);
        let idle = took.mul_f64(f64::from(100 - percent) / f64::from(percent));
        let at = Instant::now() + idle;
        self.background_after = Some(self.background_after.map_or(at, |after| after.max(at)));
    }

    /// The process is gone: its censuses and queued requests with it.
    pub fn forget(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            for (waiter, _) in process.waiters {
                let _ = waiter.send(Err(CensusFailure::NotObserved));
            }
        }
        self.asked.retain(|(queued, _)| *queued != pid);
        self.background.retain(|(queued, _)| *queued != pid);
        self.again.remove(&pid);
    }

    /// Why the engine cannot read `pid`, once a census said so.
    pub fn unsupported(&self, pid: u32) -> Option<&str> {
        self.processes.get(&pid)?.unsupported.as_deref()
    }

    pub fn latest(&self, pid: u32) -> Option<&Census> {
        self.processes.get(&pid)?.recent.back().map(|c| &**c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{HeapCensus, PAUSED};

    fn census(pid: u32, taken_at: f64) -> Census {
        Census {
            pid,
            taken_at,
            consistency: PAUSED.into(),
            pause_seconds: 0.0,
            copy_seconds: 0.0,
            parse_seconds: 0.0,
            cpu_seconds: 0.0,
            copied_bytes: 0,
            heap: HeapCensus::default(),
        }
    }

    fn done(pid: u32, result: Result<Census, CensusError>) -> CensusDone {
        CensusDone {
            pid,
            started: Instant::now(),
            cpu: Duration::ZERO,
            result,
            counters_at_copy: None,
        }
    }

    type Answer = oneshot::Receiver<Result<CensusAnswer, CensusFailure>>;

    fn ask(stage: &mut CensusStage<()>, pid: u32, max_age: u64) -> (Option<CensusJob<()>>, Answer) {
        let (reply, answer) = oneshot::channel();
        let job = stage.request(pid, &(), Duration::from_secs(max_age), reply);
        (job, answer)
    }

    #[test]
    fn a_fresh_request_while_a_census_runs_is_answered_by_the_next() {
        let mut stage = CensusStage::new(CensusConfig::default());
        let (job, mut first) = ask(&mut stage, 1, 0);
        assert!(job.is_some());
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        let (none, mut second) = ask(&mut stage, 1, 0);
        assert!(none.is_none(), "one census of a process at a time");
        let older = CensusDone {
            started,
            ..done(1, Ok(census(1, 100.0)))
        };
        let next = stage.finished(older);
        assert!(first.try_recv().unwrap().is_ok());
        assert!(
            second.try_recv().is_err(),
            "a census begun before the request answered it"
        );
        assert!(next.is_some(), "a second census for the later request");
        assert!(stage.finished(done(1, Ok(census(1, 101.0)))).is_none());
        let answer = second.try_recv().unwrap().unwrap();
        assert_eq!(answer.latest.taken_at, 101.0);
    }

    #[test]
    fn one_census_at_a_time_and_requests_for_the_same_pid_share_it() {
        let mut stage = CensusStage::new(CensusConfig::default());
        let (job, mut first) = ask(&mut stage, 1, 0);
        assert_eq!(job.map(|j| j.pid), Some(1));
        let (job, mut second) = ask(&mut stage, 1, 0);
        assert!(job.is_none(), "joins the running census");
        let (job, mut other) = ask(&mut stage, 2, 0);
        assert!(job.is_none(), "queued behind the running one");
        let next = stage.finished(done(1, Ok(census(1, unix_now()))));
        assert_eq!(next.map(|j| j.pid), Some(2), "the queued one starts");
        for answer in [&mut first, &mut second] {
            let answer = answer.try_recv().unwrap().unwrap();
            assert_eq!(answer.latest.pid, 1);
            assert!(answer.previous.is_none());
        }
        assert!(other.try_recv().is_err(), "still running");
        stage.forget(2);
        assert_eq!(
            other.try_recv().unwrap().unwrap_err(),
            CensusFailure::NotObserved
        );
        assert!(stage.finished(done(2, Ok(census(2, 0.0)))).is_none());
        assert!(
            stage.latest(2).is_none(),
            "a forgotten process keeps nothing"
        );
    }

    #[test]
    fn recent_censuses_are_reused_and_two_are_kept() {
        let mut stage = CensusStage::new(CensusConfig::default());
        for taken_at in [10.0, 20.0] {
            let (job, _) = ask(&mut stage, 1, 0);
            assert!(job.is_some());
            stage.finished(done(1, Ok(census(1, taken_at))));
        }
        let now = unix_now();
        let (job, _) = ask(&mut stage, 1, 0);
        assert!(job.is_some());
        stage.finished(done(1, Ok(census(1, now))));
        let (job, mut answer) = ask(&mut stage, 1, 60);
        assert!(job.is_none(), "a census younger than max_age is reused");
        let answer = answer.try_recv().unwrap().unwrap();
        assert_eq!(answer.latest.taken_at, now);
        assert_eq!(
            answer.previous.unwrap().taken_at,
            20.0,
            "the oldest was dropped"
        );
    }

    #[test]
    fn an_unsupported_build_is_remembered_and_not_paused_again() {
        let mut stage = CensusStage::new(CensusConfig {
            interval: Some(Duration::ZERO),
            ..CensusConfig::default()
        });
        let (job, mut answer) = ask(&mut stage, 1, 0);
        assert!(job.is_some());
        stage.finished(done(1, Err(CensusError::Unsupported("no layout".into()))));
        assert_eq!(
            answer.try_recv().unwrap().unwrap_err(),
            CensusFailure::Unsupported("no layout".into())
        );
        assert_eq!(stage.unsupported(1), Some("no layout"));
        let (job, mut again) = ask(&mut stage, 1, 0);
        assert!(job.is_none());
        assert!(matches!(
            again.try_recv().unwrap(),
            Err(CensusFailure::Unsupported(_))
        ));
        assert!(stage.maybe_automatic(1, &()).is_none());
        assert!(
            stage.maybe_automatic(2, &()).is_some(),
            "another process is due"
        );
    }

    /// A census of `pid` that took `cpu` of CPU time and four times that
    /// of wall time (a loaded node).
    fn done_after(pid: u32, cpu: Duration) -> CensusDone {
        CensusDone {
            started: Instant::now() - cpu * 4,
            cpu,
            ..done(pid, Ok(census(pid, unix_now())))
        }
    }

    #[test]
    fn background_censuses_wait_for_their_pace_and_asked_ones_do_not() {
        let mut stage = CensusStage::new(CensusConfig {
            background_cpu_percent: 20,
            ..CensusConfig::default()
        });
        assert_eq!(stage.baseline(1, &()).map(|j| j.pid), Some(1));
        assert!(stage.baseline(2, &()).is_none(), "one at a time");
        assert!(stage.baseline(3, &()).is_none());
        // 40 ms of CPU at 20 %: the next background census waits 160 ms,
        // whatever the wall time was.
        let finished_at = Instant::now();
        assert!(
            stage
                .finished(done_after(1, Duration::from_millis(40)))
                .is_none()
        );
        let wakeup = stage.take_wakeup().expect("a wake-up for pid 2");
        let wait = wakeup - finished_at;
        assert!(
            wait >= Duration::from_millis(150) && wait <= Duration::from_millis(400),
            "{wait:?}"
        );
        assert!(stage.take_wakeup().is_none(), "one wake-up per wait");
        assert!(stage.woken().is_none(), "woken early: still paced");
        // Somebody asks: no pace, and ahead of the queue.
        let (job, _answer) = ask(&mut stage, 9, 0);
        assert_eq!(job.map(|j| j.pid), Some(9));
        assert!(stage.finished(done_after(9, Duration::ZERO)).is_none());
        // Asking for a process queued in the background starts it now.
        let (job, mut answer) = ask(&mut stage, 3, 0);
        assert_eq!(job.map(|j| j.pid), Some(3));
        assert!(stage.finished(done_after(3, Duration::ZERO)).is_none());
        assert!(answer.try_recv().unwrap().is_ok());
        assert_eq!(stage.queued(), 1, "pid 2 still waits");
        let at = stage.take_wakeup().expect("a wake-up for pid 2");
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        assert_eq!(stage.woken().map(|j| j.pid), Some(2));
        assert_eq!(stage.queued(), 0);
    }

    #[test]
    fn at_100_percent_background_censuses_run_back_to_back() {
        let mut stage = CensusStage::new(CensusConfig {
            background_cpu_percent: 100,
            ..CensusConfig::default()
        });
        assert!(stage.baseline(1, &()).is_some());
        assert!(stage.baseline(2, &()).is_none());
        let next = stage.finished(done_after(1, Duration::from_millis(50)));
        assert_eq!(next.map(|j| j.pid), Some(2));
    }

    fn unix_now() -> f64 {
        crate::census::unix_seconds_now()
    }
}
