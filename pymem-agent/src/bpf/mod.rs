//! Loading the eBPF object and attaching its programs: lifecycle and syscall
//! tracepoints once, arena probes once per interpreter binary, per-
//! allocation probes once per process (so they can be detached when the
//! process goes over its budget).
use std::{
    collections::HashMap,
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::Path,
    sync::{Arc, Mutex, mpsc},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info, warn};
use pymem_common::{BlockKey, ProcStats, PyLayout, PyStack, SyscallModeState, cookie, counter};

use crate::discover::{Binary, BinaryId, elf::ProbePoint};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pymem"));

/// Load-time settings of the kernel side.
#[derive(Clone, Copy, Debug)]
pub struct KernelConfig {
    /// Budgeted probe hits per process per second; 0 = unlimited.
    pub hit_budget_per_sec: u64,
    /// Hits a process may spend at once on top of the rate.
    pub hit_budget_burst: u64,
    /// Size of the event ring buffer (a power of two, at least a page).
    pub ring_buffer_bytes: u32,
    /// Perf-event uprobes for the per-process probes even where multi-uprobe
    /// links work.
    pub perf_uprobes: bool,
}

const ARENA_PROGRAMS: [&str; 3] = ["arena_mmap", "arena_mmap_ret", "arena_munmap"];
/// The per-process programs: one entry program for every budgeted hook
/// (told apart by the attach cookie) and the return of malloc/calloc/realloc.
const ENTRY_PROGRAM: &str = "budgeted_entry";
const RETURN_PROGRAM: &str = "raw_alloc_ret";
/// Threads closing detached links: multi-uprobe links close in parallel
/// (each waits for its own grace periods), perf-event ones queue in the
/// kernel anyway.
const DETACH_THREADS: usize = 8;

pub mod events;
mod multi;

/// One attachment the agent may close again.
enum Link {
    /// A perf-event uprobe attached through aya.
    Perf(&'static str, UProbeLinkId),
    /// A multi-uprobe link (see `multi`).
    Multi(OwnedFd),
}

/// Something whose drop detaches probes, for the detach threads.
type Detached = Box<dyn Send>;

/// Owns the loaded programs and every attachment.
pub struct Probes {
    ebpf: Ebpf,
    /// Per-process programs for multi-uprobe links; None on kernels before
    /// 6.6, where each hook is a perf-event uprobe of its own.
    multi: Option<multi::MultiPrograms>,
    binaries: HashMap<BinaryId, Vec<Link>>,
    processes: HashMap<u32, Vec<Link>>,
    pub stats: PerCpuHashMap<MapData, u32, ProcStats>,
    tracked: BpfHashMap<MapData, u32, u64>,
    syscall_mode: BpfHashMap<MapData, u32, SyscallModeState>,
    counters: PerCpuArray<MapData, u64>,
    layouts: BpfHashMap<MapData, u32, PyLayout>,
    stacks: BpfHashMap<MapData, u64, PyStack>,
    /// Closes detached links off the observer's thread.
    reaper: Reaper,
}

/// Threads that drop detached links: closing a uprobe waits for RCU grace
/// periods, which must not stall the observer.
struct Reaper {
    sender: Option<mpsc::Sender<Detached>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Reaper {
    fn spawn() -> Self {
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

    fn detach(&self, detached: Detached) {
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
    fn finish(&mut self) {
        self.sender = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Probes {
    /// Loads and verifies all programs and attaches the tracepoints. Returns
    /// the event ring buffer separately: it is read by its own task.
    pub fn load(config: KernelConfig) -> Result<(Self, RingBuf<MapData>)> {
        if EBPF_OBJECT.is_empty() {
            return Err(anyhow!(
                "this pymem was built with AYA_BUILD_SKIP: it has no eBPF programs"
            ));
        }
        raise_memlock_limit();
        ensure_tracefs()?;
        let fork_offset = fork_child_pid_offset().unwrap_or(20);
        let mut ebpf = EbpfLoader::new()
            .override_global("HIT_BUDGET_PER_SEC", &config.hit_budget_per_sec, true)
            .override_global("HIT_BUDGET_BURST", &config.hit_budget_burst, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_offset, true)
            .map_max_entries("EVENTS", config.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs (are you root, with BPF and uprobes enabled?)")?;
        // Before anything takes maps out of `ebpf`: the multi-uprobe
        // programs are relocated against all of them.
        let multi = if config.perf_uprobes {
            info!("per-process probes: one perf-event uprobe per hook (--perf-uprobes)");
            None
        } else {
            match multi::MultiPrograms::load(EBPF_OBJECT, &ebpf, ENTRY_PROGRAM, RETURN_PROGRAM) {
                Ok(programs) => Some(programs),
                Err(e) => {
                    warn!(
                        "no multi-uprobe links ({e:#}; they need Linux 6.6+): per-process probes use one perf event each, which is slower to detach"
                    );
                    None
                }
            }
        };
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            debug!("no eBPF logger: {e}");
        }
        let perf_programs = [ENTRY_PROGRAM, RETURN_PROGRAM];
        let perf_programs = if multi.is_some() {
            &perf_programs[..0]
        } else {
            &perf_programs[..]
        };
        for name in ARENA_PROGRAMS.iter().chain(perf_programs) {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        let tracepoints = [
            ("process_exec", "sched", "sched_process_exec", true),
            ("process_exit", "sched", "sched_process_exit", true),
            ("process_fork", "sched", "sched_process_fork", true),
            ("sys_exit_brk", "syscalls", "sys_exit_brk", false),
            ("sys_enter_mmap", "syscalls", "sys_enter_mmap", false),
            ("sys_exit_mmap", "syscalls", "sys_exit_mmap", false),
            ("sys_enter_munmap", "syscalls", "sys_enter_munmap", false),
        ];
        for (name, category, event, required) in tracepoints {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            let result = program
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|()| program.attach(category, event).map_err(Into::into));
            match result {
                Ok(_) => {}
                Err(e) if required => {
                    return Err(e.context(format!("attaching tracepoint {category}/{event}")));
                }
                Err(e) => warn!(
                    "tracepoint {category}/{event} unavailable ({e:#}): processes over their probe budget will not be accounted by syscalls"
                ),
            }
        }
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let stats = PerCpuHashMap::try_from(ebpf.take_map("PROC_STATS").context("PROC_STATS")?)?;
        let tracked = BpfHashMap::try_from(ebpf.take_map("TRACKED").context("TRACKED")?)?;
        let syscall_mode =
            BpfHashMap::try_from(ebpf.take_map("SYSCALL_MODE").context("SYSCALL_MODE")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS")?)?;
        let layouts = BpfHashMap::try_from(ebpf.take_map("PY_LAYOUT").context("PY_LAYOUT")?)?;
        let stacks = BpfHashMap::try_from(ebpf.take_map("STACKS").context("STACKS")?)?;
        Ok((
            Self {
                ebpf,
                multi,
                binaries: HashMap::new(),
                processes: HashMap::new(),
                stats,
                tracked,
                syscall_mode,
                counters,
                layouts,
                stacks,
                reaper: Reaper::spawn(),
            },
            events,
        ))
    }

    fn uprobe(&mut self, name: &str) -> Result<&mut UProbe> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        point: ProbePoint,
        path: &Path,
        scope: UProbeScope,
        cookie: Option<u64>,
    ) -> Result<Link> {
        let attach_point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(point.file_offset),
            cookie,
        };
        let link = self
            .uprobe(name)?
            .attach(attach_point, path, scope)
            .with_context(|| {
                format!(
                    "attaching {name} at {:#x} in {}",
                    point.vaddr,
                    path.display()
                )
            })?;
        Ok(Link::Perf(name, link))
    }

    /// Attaches the arena probes of a binary, once for all its processes.
    pub fn ensure_binary(&mut self, binary: &Binary) -> Result<()> {
        if self.binaries.contains_key(&binary.id) {
            return Ok(());
        }
        let interp = binary.interpreter.clone();
        let (Some(mmap), Some(munmap)) = (interp.stubs.mmap, interp.stubs.munmap) else {
            return Err(anyhow!(
                "{}: no mmap/munmap PLT stubs, cannot see pymalloc arenas",
                binary.display_path
            ));
        };
        let arena_size = interp.version.arena_size();
        let path = binary.open_path.as_path();
        let mut links = Vec::new();
        for (name, point) in [
            ("arena_mmap", mmap),
            ("arena_mmap_ret", mmap),
            ("arena_munmap", munmap),
        ] {
            match self.attach_one(
                name,
                point,
                path,
                UProbeScope::AllProcesses,
                Some(arena_size),
            ) {
                Ok(link) => links.push(link),
                Err(e) => {
                    self.detach_all(links);
                    return Err(e);
                }
            }
        }
        info!(
            "attached arena probes to {} (Python {}, arena {} KiB)",
            binary.display_path,
            interp.version,
            arena_size >> 10
        );
        self.binaries.insert(binary.id, links);
        Ok(())
    }

    /// Attaches the budgeted per-allocation probes of one process and ends
    /// its syscall accounting. Missing stubs only lose that source (logged);
    /// attach failures undo everything.
    pub fn attach_process(&mut self, pid: u32, binary: &Binary) -> Result<()> {
        let interp = binary.interpreter.clone();
        let stubs = &interp.stubs;
        // Frees and untracks first: a block freed between two attachments
        // must not stay "live" for ever.
        let wanted = [
            ("free", cookie::FREE, stubs.free),
            (
                "PyTraceMalloc_Untrack",
                cookie::UNTRACK,
                interp.trace_untrack,
            ),
            ("malloc", cookie::MALLOC, stubs.malloc),
            ("calloc", cookie::CALLOC, stubs.calloc),
            ("realloc", cookie::REALLOC, stubs.realloc),
            ("PyTraceMalloc_Track", cookie::TRACK, interp.trace_track),
        ];
        let mut entries = Vec::new();
        let mut returns = Vec::new();
        for (function, cookie, point) in wanted {
            let Some(point) = point else {
                debug!(
                    "pid {pid}: {} has no probe point for {function}",
                    binary.display_path
                );
                continue;
            };
            entries.push((point, cookie));
            if matches!(cookie, cookie::MALLOC | cookie::CALLOC | cookie::REALLOC) {
                returns.push(point);
            }
        }
        let links = match &self.multi {
            Some(programs) => {
                let entry_offsets: Vec<(u64, u64)> = entries
                    .iter()
                    .map(|(point, cookie)| (point.file_offset, *cookie))
                    .collect();
                let return_offsets: Vec<u64> = returns.iter().map(|p| p.file_offset).collect();
                programs
                    .attach(&multi::MultiAttach {
                        pid,
                        path: &binary.open_path,
                        entries: &entry_offsets,
                        returns: &return_offsets,
                    })?
                    .into_iter()
                    .map(Link::Multi)
                    .collect()
            }
            None => self.attach_process_perf(pid, binary, &entries, &returns)?,
        };
        let _ = self.syscall_mode.remove(&pid);
        self.processes.insert(pid, links);
        Ok(())
    }

    /// Kernels without multi-uprobe links: one perf-event uprobe per hook.
    fn attach_process_perf(
        &mut self,
        pid: u32,
        binary: &Binary,
        entries: &[(ProbePoint, u64)],
        returns: &[ProbePoint],
    ) -> Result<Vec<Link>> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        let wanted = entries
            .iter()
            .map(|(point, cookie)| (ENTRY_PROGRAM, *point, Some(*cookie)))
            .chain(returns.iter().map(|point| (RETURN_PROGRAM, *point, None)));
        let mut links = Vec::new();
        for (name, point, cookie) in wanted {
            match self.attach_one(name, point, &binary.open_path, scope, cookie) {
                Ok(link) => links.push(link),
                Err(e) => {
                    self.detach_all(links);
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    /// Marks a process as observed (exit and fork events are reported for
    /// it) and accounts its memory outside pymalloc by syscalls until its
    /// per-allocation probes are attached.
    pub fn track(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        self.tracked
            .insert(pid, arena_size, 0)
            .context("TRACKED map")?;
        self.account_by_syscalls(pid, arena_size)
    }

    /// Hands the links to the detach threads.
    fn detach_all(&mut self, links: Vec<Link>) {
        for link in links {
            match link {
                Link::Multi(fd) => self.reaper.detach(Box::new(fd)),
                Link::Perf(name, id) => {
                    match self.uprobe(name).and_then(|p| Ok(p.take_link(id)?)) {
                        Ok(owned) => self.reaper.detach(Box::new(owned)),
                        Err(e) => debug!("detaching {name}: {e:#}"),
                    }
                }
            }
        }
    }

    /// Stops the per-allocation probes of a process (budget or exit).
    pub fn detach_process(&mut self, pid: u32) {
        if let Some(links) = self.processes.remove(&pid) {
            self.detach_all(links);
        }
    }

    /// Detaches everything and waits until the kernel is done with it.
    pub fn shutdown(&mut self) {
        let links: Vec<Link> = self
            .processes
            .drain()
            .flat_map(|(_, links)| links)
            .chain(self.binaries.drain().flat_map(|(_, links)| links))
            .collect();
        self.detach_all(links);
        self.reaper.finish();
    }

    /// Moves a process to syscall accounting: per-allocation probes off,
    /// brk/mmap tracepoints on from its current program break.
    pub fn switch_to_syscalls(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        self.detach_process(pid);
        self.account_by_syscalls(pid, arena_size)
    }

    fn account_by_syscalls(&mut self, pid: u32, arena_size: u64) -> Result<()> {
        let brk = crate::discover::current_brk(pid).unwrap_or(0);
        self.syscall_mode
            .insert(pid, SyscallModeState { brk, arena_size }, 0)
            .context("SYSCALL_MODE map")?;
        Ok(())
    }

    /// Tells the kernel side where this process keeps its Python stack.
    pub fn set_layout(&mut self, pid: u32, layout: PyLayout) -> Result<()> {
        self.layouts.insert(pid, layout, 0).context("PY_LAYOUT map")
    }

    /// A captured stack, innermost frame first.
    pub fn stack(&self, id: u64) -> Option<Vec<pymem_common::PyFrame>> {
        let stack = self.stacks.get(&id, 0).ok()?;
        let len = (stack.len as usize).min(stack.frames.len());
        Some(stack.frames[..len].to_vec())
    }

    /// Forgets every trace of an exited process.
    pub fn forget_process(&mut self, pid: u32) {
        self.detach_process(pid);
        let _ = self.layouts.remove(&pid);
        let _ = self.tracked.remove(&pid);
        let _ = self.syscall_mode.remove(&pid);
        let _ = self.stats.remove(&pid);
        if let Some(map) = self.ebpf.map_mut("BUDGET")
            && let Ok(mut map) = BpfHashMap::<_, u32, pymem_common::BudgetState>::try_from(map)
        {
            let _ = map.remove(&pid);
        }
        if let Some(map) = self.ebpf.map_mut("SAMPLER")
            && let Ok(mut map) = BpfHashMap::<_, u32, u64>::try_from(map)
        {
            let _ = map.remove(&pid);
        }
    }

    /// Detaches the arena probes of binaries no process runs any more.
    pub fn retain_binaries(&mut self, in_use: impl Fn(&BinaryId) -> bool) {
        let unused: Vec<BinaryId> = self
            .binaries
            .keys()
            .filter(|id| !in_use(id))
            .copied()
            .collect();
        for id in unused {
            if let Some(links) = self.binaries.remove(&id) {
                self.detach_all(links);
            }
        }
    }

    /// Sums the per-CPU counters of one process.
    pub fn process_stats(&self, pid: u32) -> Option<ProcStats> {
        let per_cpu = self.stats.get(&pid, 0).ok()?;
        let mut total = ProcStats::default();
        for cpu in per_cpu.iter() {
            total.accumulate(cpu);
        }
        Some(total)
    }

    /// Kernel-side drop counters (summed over CPUs).
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    pub fn events_lost(&self) -> u64 {
        self.counter(counter::EVENTS_LOST)
    }

    pub fn live_map_full(&self) -> u64 {
        self.counter(counter::LIVE_MAP_FULL)
    }

    pub fn attached_binaries(&self) -> usize {
        self.binaries.len()
    }

    pub fn probe_links(&self) -> usize {
        self.binaries.values().map(Vec::len).sum::<usize>()
            + self.processes.values().map(Vec::len).sum::<usize>()
    }

    /// Deletes live-block entries and counters of processes that are gone
    /// (exits race with in-flight probes; this sweeps what they left).
    pub fn sweep(&mut self, alive: impl Fn(u32) -> bool) {
        for name in ["ARENAS", "RAW_LIVE", "EXT_LIVE", "SYS_LIVE"] {
            let Some(map) = self.ebpf.map_mut(name) else {
                continue;
            };
            let Ok(mut map) = BpfHashMap::<_, BlockKey, u64>::try_from(map) else {
                continue;
            };
            let dead: Vec<BlockKey> = map.keys().flatten().filter(|k| !alive(k.tgid)).collect();
            for key in dead {
                let _ = map.remove(&key);
            }
        }
        let dead: Vec<u32> = self
            .stats
            .keys()
            .flatten()
            .filter(|&pid| !alive(pid))
            .collect();
        for pid in dead {
            let _ = self.stats.remove(&pid);
        }
    }
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoint ids live in tracefs; mount it when the host has not.
fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS)?;
    let fstype = std::ffi::CString::new("tracefs")?;
    // SAFETY: valid NUL-terminated strings, no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Reads the offset of `child_pid` in sched_process_fork's record.
fn fork_child_pid_offset() -> Option<u64> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(format!("{root}/events/sched/sched_process_fork/format")).ok()
        })?;
    format.lines().find_map(|line| {
        if !line.contains(" child_pid;") {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}
