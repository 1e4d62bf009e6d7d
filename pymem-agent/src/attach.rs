//! Loading the eBPF object and attaching its programs: lifecycle and syscall
//! tracepoints once, arena probes once per interpreter binary, per-
//! allocation probes once per process (so they can be detached when the
//! process goes over its budget).
use std::{collections::HashMap, num::NonZeroU32, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info, warn};
use pymem_common::{BlockKey, ProcStats, PyLayout, PyStack, SyscallModeState, counter};

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
}

const ARENA_PROGRAMS: [&str; 3] = ["arena_mmap", "arena_mmap_ret", "arena_munmap"];
const PROCESS_PROGRAMS: [&str; 6] = [
    "raw_malloc",
    "raw_calloc",
    "raw_realloc",
    "raw_alloc_ret",
    "raw_free",
    "ext_track",
];
const UNTRACK_PROGRAM: &str = "ext_untrack";

/// Links of one process's budgeted probes.
#[derive(Default)]
struct ProcessLinks {
    links: Vec<(&'static str, UProbeLinkId)>,
}

/// Owns the loaded programs and every attachment.
pub struct Probes {
    ebpf: Ebpf,
    binaries: HashMap<BinaryId, Vec<(&'static str, UProbeLinkId)>>,
    processes: HashMap<u32, ProcessLinks>,
    pub stats: PerCpuHashMap<MapData, u32, ProcStats>,
    tracked: BpfHashMap<MapData, u32, u64>,
    syscall_mode: BpfHashMap<MapData, u32, SyscallModeState>,
    counters: PerCpuArray<MapData, u64>,
    layouts: BpfHashMap<MapData, u32, PyLayout>,
    stacks: BpfHashMap<MapData, u64, PyStack>,
    /// Closes detached links off the observer's thread.
    reaper: std::sync::mpsc::Sender<UProbeLink>,
}

/// Drops detached links one by one on its own thread.
fn spawn_reaper() -> std::sync::mpsc::Sender<UProbeLink> {
    let (tx, rx) = std::sync::mpsc::channel::<UProbeLink>();
    let spawned = std::thread::Builder::new()
        .name("pymem-detach".into())
        .spawn(move || {
            for link in rx {
                drop(link);
            }
        });
    if let Err(e) = spawned {
        warn!("no detach thread ({e}); detaching inline");
    }
    tx
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
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            debug!("no eBPF logger: {e}");
        }
        for name in ARENA_PROGRAMS
            .iter()
            .chain(PROCESS_PROGRAMS.iter())
            .chain([UNTRACK_PROGRAM].iter())
        {
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
                binaries: HashMap::new(),
                processes: HashMap::new(),
                stats,
                tracked,
                syscall_mode,
                counters,
                layouts,
                stacks,
                reaper: spawn_reaper(),
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
    ) -> Result<(&'static str, UProbeLinkId)> {
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
        Ok((name, link))
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
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        let interp = binary.interpreter.clone();
        let stubs = &interp.stubs;
        let wanted: [(&'static str, Option<ProbePoint>); 9] = [
            ("raw_malloc", stubs.malloc),
            ("raw_alloc_ret", stubs.malloc),
            ("raw_calloc", stubs.calloc),
            ("raw_alloc_ret", stubs.calloc),
            ("raw_realloc", stubs.realloc),
            ("raw_alloc_ret", stubs.realloc),
            ("raw_free", stubs.free),
            ("ext_track", interp.trace_track),
            (UNTRACK_PROGRAM, interp.trace_untrack),
        ];
        let mut links = Vec::new();
        for (name, point) in wanted {
            let Some(point) = point else {
                debug!(
                    "pid {pid}: {} has no probe point for {name}",
                    binary.display_path
                );
                continue;
            };
            match self.attach_one(name, point, &binary.open_path, scope, None) {
                Ok(link) => links.push(link),
                Err(e) => {
                    self.detach_all(links);
                    return Err(e);
                }
            }
        }
        let _ = self.syscall_mode.remove(&pid);
        self.processes.insert(pid, ProcessLinks { links });
        Ok(())
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

    /// Hands the links to the reaper thread: closing a uprobe perf event
    /// waits for RCU grace periods under a kernel-wide mutex, which must not
    /// stall the observer.
    fn detach_all(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (name, link) in links {
            match self.uprobe(name).and_then(|p| Ok(p.take_link(link)?)) {
                Ok(owned) => {
                    if let Err(std::sync::mpsc::SendError(owned)) = self.reaper.send(owned) {
                        drop(owned);
                    }
                }
                Err(e) => debug!("detaching {name}: {e:#}"),
            }
        }
    }

    /// Stops the per-allocation probes of a process (budget or exit).
    pub fn detach_process(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            self.detach_all(process.links);
        }
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
            + self
                .processes
                .values()
                .map(|p| p.links.len())
                .sum::<usize>()
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
