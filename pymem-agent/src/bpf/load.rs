//! Loading and verifying the eBPF object: load-time globals, the programs,
//! the tracepoints (attached once), the maps.
use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{TracePoint, UProbe},
};
use log::{debug, info, warn};
use pymem_common::{
    NO_OFFSET,
    names::{global, map, program},
};

use super::{
    Probes, kernel_log::KernelLog, links::Links, maps::Maps, multi, sweep::Sweeper, tracefs,
};

/// The eBPF object built by build.rs.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pymem"));

/// Load-time settings of the kernel side.
#[derive(Clone, Copy, Debug)]
pub struct KernelConfig {
    /// Budgeted probe hits per process per second; 0 = unlimited.
    pub hit_budget_per_sec: u64,
    /// Hits a process may spend at once on top of the rate, once earned.
    pub hit_budget_burst: u64,
    /// Hits a process may spend at once before it has earned the burst.
    pub hit_budget_first_burst: u64,
    /// Size of the event ring buffer (a power of two, at least a page).
    pub ring_buffer_bytes: u32,
    /// Perf-event uprobes for the per-process probes even where multi-uprobe
    /// links work.
    pub perf_uprobes: bool,
}

const ARENA_PROGRAMS: [&str; 3] = [
    program::ARENA_MMAP,
    program::ARENA_MMAP_RET,
    program::ARENA_MUNMAP,
];
/// The per-process programs, loaded as perf-event uprobes where there are no
/// multi-uprobe links.
const PER_PROCESS_PROGRAMS: [&str; 2] = [program::BUDGETED_ENTRY, program::RAW_ALLOC_RET];

/// What a kernel without one tracepoint loses; `Required` ones fail the load.
#[derive(Clone, Copy)]
enum Without {
    Required,
    /// Logged once, at load.
    Loses(&'static str),
}

const NO_SYSCALL_ACCOUNTING: Without =
    Without::Loses("processes over their probe budget will not be accounted by syscalls");

/// Tracepoint programs with their category and event.
const TRACEPOINTS: [(&str, &str, &str, Without); 8] = [
    (
        program::PROCESS_EXEC,
        "sched",
        "sched_process_exec",
        Without::Required,
    ),
    (
        program::PROCESS_EXIT,
        "sched",
        "sched_process_exit",
        Without::Required,
    ),
    (
        program::PROCESS_FORK,
        "sched",
        "sched_process_fork",
        Without::Required,
    ),
    (
        program::SYS_EXIT_BRK,
        "syscalls",
        "sys_exit_brk",
        NO_SYSCALL_ACCOUNTING,
    ),
    (
        program::SYS_ENTER_MMAP,
        "syscalls",
        "sys_enter_mmap",
        NO_SYSCALL_ACCOUNTING,
    ),
    (
        program::SYS_EXIT_MMAP,
        "syscalls",
        "sys_exit_mmap",
        NO_SYSCALL_ACCOUNTING,
    ),
    (
        program::SYS_ENTER_MUNMAP,
        "syscalls",
        "sys_enter_munmap",
        NO_SYSCALL_ACCOUNTING,
    ),
    (
        program::OOM_MARK_VICTIM,
        "oom",
        "mark_victim",
        Without::Loses("processes killed for memory get no post-mortem"),
    ),
];

impl Probes {
    /// Loads and verifies all programs and attaches the tracepoints. Returns
    /// the event ring buffer separately: it is read by its own task.
    pub fn load(config: KernelConfig) -> Result<(Self, RingBuf<MapData>)> {
        Self::load_with(config, |_| {})
    }

    /// `load`, with `adjust` changing the loader's settings (tests).
    fn load_with(
        config: KernelConfig,
        adjust: impl FnOnce(&mut EbpfLoader<'_>),
    ) -> Result<(Self, RingBuf<MapData>)> {
        if EBPF_OBJECT.is_empty() {
            return Err(anyhow!(
                "this pymem was built with AYA_BUILD_SKIP: it has no eBPF programs"
            ));
        }
        raise_memlock_limit();
        tracefs::ensure_tracefs()?;
        let fork_offset = tracefs::fork_child_pid_offset().unwrap_or(20);
        let (oom_pid_offset, oom_anon_rss_offset) = tracefs::oom_victim_offsets();
        let oom_pid_offset = oom_pid_offset.unwrap_or(8);
        let oom_anon_rss_offset = oom_anon_rss_offset.unwrap_or(NO_OFFSET);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(global::HIT_BUDGET_PER_SEC, &config.hit_budget_per_sec, true)
            .override_global(global::HIT_BUDGET_BURST, &config.hit_budget_burst, true)
            .override_global(
                global::HIT_BUDGET_FIRST_BURST,
                &config.hit_budget_first_burst,
                true,
            )
            .override_global(global::FORK_CHILD_PID_OFFSET, &fork_offset, true)
            .override_global(global::OOM_VICTIM_PID_OFFSET, &oom_pid_offset, true)
            .override_global(
                global::OOM_VICTIM_ANON_RSS_OFFSET,
                &oom_anon_rss_offset,
                true,
            )
            .map_max_entries(map::EVENTS, config.ring_buffer_bytes);
        adjust(&mut loader);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs (are you root, with BPF and uprobes enabled?)")?;
        // Before anything takes maps out of `ebpf`: the multi-uprobe
        // programs are relocated against all of them.
        let multi = if config.perf_uprobes {
            info!("per-process probes: one perf-event uprobe per hook (--perf-uprobes)");
            None
        } else {
            let [entry, ret] = PER_PROCESS_PROGRAMS;
            match multi::MultiPrograms::load(EBPF_OBJECT, &ebpf, entry, ret) {
                Ok(programs) => Some(programs),
                Err(e) => {
                    warn!(
                        "no multi-uprobe links ({e:#}; they need Linux 6.6+): per-process probes use one perf event each, which is slower to detach"
                    );
                    None
                }
            }
        };
        // Kept for as long as the programs: they write to its map.
        let kernel_log = KernelLog::start(&mut ebpf);
        let perf_programs = if multi.is_some() {
            &PER_PROCESS_PROGRAMS[..0]
        } else {
            &PER_PROCESS_PROGRAMS[..]
        };
        for name in ARENA_PROGRAMS.iter().chain(perf_programs) {
            let program: &mut UProbe = program_mut(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        for (name, category, event, without) in TRACEPOINTS {
            let program: &mut TracePoint = program_mut(&mut ebpf, name)?.try_into()?;
            let result = program
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|()| program.attach(category, event).map_err(Into::into));
            match (result, without) {
                (Ok(_), _) => {}
                (Err(e), Without::Required) => {
                    return Err(e.context(format!("attaching tracepoint {category}/{event}")));
                }
                (Err(e), Without::Loses(what)) => {
                    warn!("tracepoint {category}/{event} unavailable ({e:#}): {what}")
                }
            }
        }
        let (maps, swept, events) = Maps::take(&mut ebpf)?;
        Ok((
            Self {
                links: Links::new(ebpf, multi),
                maps,
                sweeper: Sweeper::spawn(swept),
                _kernel_log: kernel_log,
            },
            events,
        ))
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))
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

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};
    use pymem_common::{counter, names};

    use super::*;

    /// Every name the agent looks up is in the built object, and every
    /// program of the object has a name here.
    #[test]
    fn names_are_those_of_the_built_object() {
        if EBPF_OBJECT.is_empty() {
            return; // AYA_BUILD_SKIP
        }
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("parsing the eBPF object");
        let missing: Vec<&str> = names::map::ALL
            .iter()
            .copied()
            .filter(|name| !obj.maps.contains_key(*name))
            .collect();
        assert!(missing.is_empty(), "maps not in the object: {missing:?}");
        let missing: Vec<&str> = names::program::ALL
            .iter()
            .copied()
            .filter(|name| !obj.programs.contains_key(*name))
            .collect();
        assert!(
            missing.is_empty(),
            "programs not in the object: {missing:?}"
        );
        let unnamed: Vec<&String> = obj
            .programs
            .keys()
            .filter(|name| !names::program::ALL.contains(&name.as_str()))
            .collect();
        assert!(
            unnamed.is_empty(),
            "programs without a name constant: {unnamed:?}"
        );
        let file = object::File::parse(EBPF_OBJECT).expect("parsing the eBPF object");
        for &global in names::global::ALL {
            assert!(
                file.symbols().any(|symbol| symbol.name() == Ok(global)),
                "global {global} not in the object"
            );
        }
    }

    #[test]
    fn every_error_counter_is_of_a_map() {
        let mut indices: Vec<u32> = counter::MAP_ERRORS.iter().map(|(i, _)| *i).collect();
        indices.push(counter::LIVE_MAP_FULL);
        indices.sort_unstable();
        assert_eq!(indices, (0..counter::LEN).collect::<Vec<_>>());
        for (index, name) in counter::MAP_ERRORS {
            assert!(names::map::ALL.contains(&name), "{name}");
            assert_eq!(counter::name(index), name);
        }
    }

    /// Needs root: loads every program into this kernel, both ways of
    /// attaching the per-process probes.
    #[test]
    fn the_verifier_accepts_every_program() {
        if EBPF_OBJECT.is_empty() {
            return; // AYA_BUILD_SKIP
        }
        for perf_uprobes in [true, false] {
            let (mut probes, _events) = Probes::load(KernelConfig {
                hit_budget_per_sec: 1000,
                hit_budget_burst: 100,
                hit_budget_first_burst: 20,
                ring_buffer_bytes: 1 << 16,
                perf_uprobes,
            })
            .expect("loading the programs");
            let errors = probes.kernel_errors();
            assert_eq!(errors.len(), counter::MAP_ERRORS.len());
            assert!(probes._kernel_log.is_some(), "no kernel log forwarding");
            probes.shutdown();
        }
        if multi_uprobe_kernel() {
            let ebpf = EbpfLoader::new()
                .load(EBPF_OBJECT)
                .expect("loading the object");
            let [entry, ret] = PER_PROCESS_PROGRAMS;
            multi::MultiPrograms::load(EBPF_OBJECT, &ebpf, entry, ret)
                .expect("verifying the multi-uprobe programs");
        }
    }

    /// A full PROC_STATS is counted under its name: this process takes the
    /// only entry, a tracked child then fails to get one.
    #[test]
    fn a_full_map_is_counted_by_name() {
        if EBPF_OBJECT.is_empty() {
            return; // AYA_BUILD_SKIP
        }
        let config = KernelConfig {
            hit_budget_per_sec: 0,
            hit_budget_burst: 0,
            hit_budget_first_burst: 0,
            ring_buffer_bytes: 1 << 16,
            perf_uprobes: true,
        };
        let (mut probes, _events) = Probes::load_with(config, |loader| {
            loader.map_max_entries(map::PROC_STATS, 1);
        })
        .expect("loading the programs");
        // Any anonymous mapping of this process while it is accounted by
        // syscalls takes the entry.
        probes.track(std::process::id(), 0).expect("tracking");
        let block = std::hint::black_box(vec![1u8; 16 << 20]);
        drop(block);
        assert!(probes.process_stats(std::process::id()).is_some());
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "sleep 0.3; exec dd if=/dev/zero of=/dev/null bs=16M count=1 status=none",
            ])
            .spawn()
            .expect("spawning sh");
        probes.track(child.id(), 0).expect("tracking the child");
        assert!(child.wait().expect("waiting").success());
        let errors: std::collections::HashMap<_, _> = probes.kernel_errors().into_iter().collect();
        assert!(errors[map::PROC_STATS] > 0, "{errors:?}");
        probes.shutdown();
    }

    /// Linux 6.6 or later.
    fn multi_uprobe_kernel() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(['.', '-']).map(str::parse::<u32>);
        matches!(
            (parts.next(), parts.next()),
            (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= (6, 6)
        )
    }
}
