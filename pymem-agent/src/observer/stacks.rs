//! Python stacks: verifying each process's stack layout against its memory
//! (off the loop) before the kernel walks it, and symbolising the stacks
//! behind its allocation sites.
use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{debug, info, warn};

use super::{Found, Observed, Observer};
use crate::{
    bpf::Probes,
    cpython::{
        self, Frame, ProcessLayout, Symbolizer,
        layout_check::{self, Verdict},
    },
    discover::{BinaryId, PythonProcess},
    sites::{self, Site, StackBytes},
};

/// How long a new process may take to show a verifiable Python stack
/// (initialised interpreter, a thread in Python code).
const STACK_CHECK_PATIENCE: Duration = Duration::from_secs(60);

/// Loop time per sample for symbolising new stacks behind `--site-metrics`;
/// what is left waits for the next sample.
const SITE_METRICS_SYMBOLISING: Duration = Duration::from_millis(5);

/// Loop time per sample for symbolising new stacks that hold live bytes
/// (all of them are, for post-mortems); what is left waits for the next
/// sample. After the first samples of a process there is rarely any.
const LIVE_STACK_SYMBOLISING: Duration = Duration::from_millis(5);

/// A process's stack layout not yet decided on.
pub(super) struct PendingCheck {
    /// Checks started from then on that find the process not far enough
    /// give up.
    until: Instant,
    /// A check is under way off the loop.
    running: bool,
}

impl PendingCheck {
    /// The first check, started with the observation.
    pub(super) fn first(since: Instant) -> Self {
        Self {
            until: since + STACK_CHECK_PATIENCE,
            running: true,
        }
    }
}

/// A layout check's answer, from off the loop.
pub(super) struct LayoutChecked {
    pid: u32,
    /// The observation it was asked for (`Observed::since`).
    since: Instant,
    started: Instant,
    /// The process's layout and what its memory says of it.
    layout: Result<(ProcessLayout, Verdict)>,
}

/// Whether a process gets Python stacks.
enum StackSetup {
    On(Symbolizer),
    /// The layout cannot be verified yet (the reason); try again.
    NotYet(String),
    Off,
}

impl Observer {
    /// Works out the process's stack layout and checks it against the
    /// process's memory on a blocking task (the check reads /proc and
    /// sleeps between attempts); the answer comes back as `Found`.
    pub(super) fn spawn_stack_check(
        &self,
        process: &PythonProcess,
        since: Instant,
        started: Instant,
    ) {
        let pid = process.pid;
        let binary = process.binary.clone();
        let sample_bytes = self.config.sample_bytes;
        let tx = self.found_tx.clone();
        tokio::task::spawn_blocking(move || {
            let layout = cpython::layout_for(pid, &binary, sample_bytes).map(|layout| {
                let verdict = layout_check::check(pid, binary.interpreter.version, &layout);
                (layout, verdict)
            });
            let _ = tx.send(Found::StackCheck(Box::new(LayoutChecked {
                pid,
                since,
                started,
                layout,
            })));
        });
    }

    /// Checks again the stack layouts of processes that were not far
    /// enough (just started) when last checked.
    pub(super) fn retry_stack_checks(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (&pid, observed) in &mut self.observed {
            if let Some(check) = observed.stack_check.as_mut().filter(|c| !c.running) {
                check.running = true;
                due.push(pid);
            }
        }
        for pid in due {
            let observed = &self.observed[&pid];
            self.spawn_stack_check(&observed.process, observed.since, now);
        }
    }

    /// Acts on a layout check: gives the kernel the layout if the memory
    /// confirms it (a wrong layout would give garbage stacks), tries again
    /// at the next sample while the process is not far enough, gives up
    /// after `STACK_CHECK_PATIENCE`.
    pub(super) fn on_layout_checked(&mut self, checked: LayoutChecked) {
        let Self {
            observed,
            probes,
            stackless_binaries,
            ..
        } = self;
        let Some(observed) = observed
            .get_mut(&checked.pid)
            .filter(|o| o.since == checked.since)
        else {
            return; // exited, or a new process under the same pid
        };
        let Some(check) = &mut observed.stack_check else {
            return;
        };
        check.running = false;
        let until = check.until;
        let process = &observed.process;
        match stack_setup(probes, stackless_binaries, process, checked.layout) {
            StackSetup::On(symbolizer) => {
                observed.symbolizer = Some(symbolizer);
                observed.stack_check = None;
            }
            StackSetup::NotYet(why) if checked.started >= until => {
                info!(
                    "pid {} ({}): Python stacks stay off: the stack layout could not be verified within {}s: {why}",
                    checked.pid,
                    process.comm,
                    STACK_CHECK_PATIENCE.as_secs()
                );
                observed.stack_check = None;
            }
            StackSetup::NotYet(_) => {}
            StackSetup::Off => observed.stack_check = None,
        }
    }

    /// Symbolises the stacks of a process's live attribution.
    pub(super) fn sites(&mut self, pid: u32) -> Option<Vec<Site>> {
        self.observed
            .get_mut(&pid)?
            .symbolised_sites(&self.probes, None)
    }

    /// Symbolises new stacks holding live bytes, for at most
    /// `LIVE_STACK_SYMBOLISING` of loop time per sample: stacks are read
    /// while their process runs, so a post-mortem of one killed for memory
    /// has its sites when its memory is already gone.
    pub(super) fn symbolise_live_stacks(&mut self) {
        let deadline = Instant::now() + LIVE_STACK_SYMBOLISING;
        for observed in self.observed.values_mut() {
            if !observed.symbolise_live_stacks(&self.probes, deadline) {
                return;
            }
        }
    }

    /// Each process's `site_metrics` heaviest sites that hold memory. Cheap
    /// after the first time: symbolised stacks are cached per stack id.
    /// New stacks are symbolised for at most `SITE_METRICS_SYMBOLISING`
    /// per call; a process with stacks left keeps its last published sites
    /// until they are done.
    pub(super) fn top_sites(&mut self) -> BTreeMap<u32, Vec<Site>> {
        let limit = self.config.site_metrics;
        if limit == 0 {
            return BTreeMap::new();
        }
        let deadline = Instant::now() + SITE_METRICS_SYMBOLISING;
        let published = self.snapshot.read().expect("snapshot lock");
        self.observed
            .iter_mut()
            .filter_map(|(&pid, observed)| {
                let sites = match observed.symbolised_sites(&self.probes, Some(deadline)) {
                    Some(mut sites) => {
                        sites.retain(|site| site.bytes > 0);
                        sites.truncate(limit);
                        // Metrics need no stacks; snapshots are cloned per
                        // request.
                        sites.iter_mut().for_each(|site| site.stack.clear());
                        sites
                    }
                    None => published.top_sites.get(&pid)?.clone(),
                };
                Some((pid, sites))
            })
            .collect()
    }
}

impl Observed {
    /// The sites of this process's live attribution, symbolising stacks not
    /// seen before; `None` if `deadline` passes with stacks left to do.
    fn symbolised_sites(
        &mut self,
        probes: &Probes,
        deadline: Option<Instant>,
    ) -> Option<Vec<Site>> {
        let mut stacks = Vec::new();
        for (stack_id, bytes) in self.sites.stacks() {
            let frames = match self.frames.get(&stack_id) {
                Some(frames) => frames.clone(),
                None => {
                    if deadline.is_some_and(|at| Instant::now() >= at) {
                        return None;
                    }
                    let frames = symbolise(self.symbolizer.as_mut(), probes, stack_id);
                    self.frames.insert(stack_id, frames.clone());
                    frames
                }
            };
            stacks.push((frames, bytes));
        }
        Some(sites::group_sites(stacks))
    }

    /// Symbolises the stacks that hold live bytes and are not symbolised
    /// yet, until `deadline`; false if it passed with stacks left. A
    /// process killed for memory may lose its memory before its
    /// post-mortem can read it: what was read before is cached.
    pub(super) fn symbolise_live_stacks(&mut self, probes: &Probes, deadline: Instant) -> bool {
        if self.symbolizer.is_none() {
            return true;
        }
        for (stack_id, bytes) in self.sites.stacks() {
            if bytes.live == 0 || self.frames.contains_key(&stack_id) {
                continue;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let frames = symbolise(self.symbolizer.as_mut(), probes, stack_id);
            self.frames.insert(stack_id, frames);
        }
        true
    }

    /// The sites of a process the OOM killer chose, symbolised now, the
    /// heaviest stacks first (its memory may vanish any moment; stacks
    /// symbolised before are cached), and how many stacks could no longer
    /// be read (their frames read `<unknown>`).
    pub(super) fn sites_at_kill(&mut self, probes: &Probes) -> (Vec<Site>, usize) {
        let mut by_weight: Vec<(u64, StackBytes)> = self.sites.stacks().collect();
        by_weight.sort_by_key(|(_, bytes)| std::cmp::Reverse((bytes.live, bytes.allocated)));
        let mut unreadable = 0;
        let mut stacks = Vec::with_capacity(by_weight.len());
        for (stack_id, bytes) in by_weight {
            let frames = match self.frames.get(&stack_id) {
                Some(frames) => frames.clone(),
                None => {
                    // Not cached: the process is going.
                    let frames = symbolise(self.symbolizer.as_mut(), probes, stack_id);
                    if !frames.is_empty() && frames.iter().all(Frame::is_unknown) {
                        unreadable += 1;
                    }
                    frames
                }
            };
            stacks.push((frames, bytes));
        }
        (sites::group_sites(stacks), unreadable)
    }
}

/// The frames of one captured stack; a process without stacks (or a stack
/// the kernel no longer holds) has one frame saying so.
fn symbolise(symbolizer: Option<&mut Symbolizer>, probes: &Probes, stack_id: u64) -> Vec<Frame> {
    match (symbolizer, probes.stack(stack_id)) {
        (Some(symbolizer), Some(raw)) => symbolizer.stack(&raw),
        _ => vec![Frame {
            function: "<no Python stack>".into(),
            file: String::new(),
            line: 0,
        }],
    }
}

/// What a layout check means for the process's stacks; the kernel gets the
/// layout when it fits. Logs once per binary where stacks are not
/// supported.
fn stack_setup(
    probes: &mut Probes,
    stackless_binaries: &mut HashSet<BinaryId>,
    process: &PythonProcess,
    checked: Result<(ProcessLayout, Verdict)>,
) -> StackSetup {
    let pid = process.pid;
    let layout = match checked {
        Ok((layout, verdict)) => {
            match verdict {
                Verdict::Verified(what) => debug!("pid {pid}: stack layout verified: {what}"),
                Verdict::Unchecked => {}
                Verdict::NotYet(why) => return StackSetup::NotYet(why),
                Verdict::Wrong(why) => {
                    warn!(
                        "pid {pid} ({}): Python stacks disabled: the Python {} stack layout does not fit this process: {why}",
                        process.comm, process.binary.interpreter.version
                    );
                    return StackSetup::Off;
                }
            }
            Ok(layout)
        }
        Err(e) => Err(e),
    };
    let result = layout.and_then(|layout| {
        let symbolizer = Symbolizer::new(pid, layout.code)?;
        probes.set_layout(pid, layout.kernel)?;
        Ok(symbolizer)
    });
    match result {
        Ok(symbolizer) => StackSetup::On(symbolizer),
        Err(e) => {
            if stackless_binaries.insert(process.binary.id) {
                info!(
                    "{}: no allocation sites: {e:#}",
                    process.binary.display_path
                );
            }
            StackSetup::Off
        }
    }
}
