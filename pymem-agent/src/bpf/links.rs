//! The probes' attachments: arena probes once per interpreter binary,
//! per-allocation probes once per process (multi-uprobe links, or one
//! perf-event uprobe per hook on older kernels), closed by the `Reaper`.
use std::{collections::HashMap, num::NonZeroU32, os::fd::OwnedFd, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info};
use pymem_common::{cookie, names::program};

use super::{multi, reaper::Reaper};
use crate::{
    cpython::gc::{GcHooks, GcProbe},
    discover::{Binary, BinaryId, elf::ProbePoint},
};

/// Whether a process's collector is probed: by what, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcAttach {
    Attached(String),
    Unavailable(String),
}

/// One attachment the agent may close again.
enum Link {
    /// A perf-event uprobe attached through aya.
    Perf(&'static str, UProbeLinkId),
    /// A multi-uprobe link (see `multi`).
    Multi(OwnedFd),
}

/// The loaded programs and every attachment of them.
pub(super) struct Links {
    /// The programs (its maps are taken out by `Maps`).
    ebpf: Ebpf,
    /// Per-process programs for multi-uprobe links; None on kernels before
    /// 6.6, where each hook is a perf-event uprobe of its own.
    multi: Option<multi::MultiPrograms>,
    binaries: HashMap<BinaryId, Vec<Link>>,
    processes: HashMap<u32, Vec<Link>>,
    /// Closes detached links off the observer's thread.
    reaper: Reaper,
}

impl Links {
    pub(super) fn new(ebpf: Ebpf, multi: Option<multi::MultiPrograms>) -> Self {
        Self {
            ebpf,
            multi,
            binaries: HashMap::new(),
            processes: HashMap::new(),
            reaper: Reaper::spawn(),
        }
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

    /// Attaches each of `wanted` as a perf-event uprobe; the first failure
    /// detaches those attached before it.
    fn attach_all(
        &mut self,
        path: &Path,
        scope: UProbeScope,
        wanted: impl IntoIterator<Item = (&'static str, ProbePoint, Option<u64>)>,
    ) -> Result<Vec<Link>> {
        let mut links = Vec::new();
        for (name, point, cookie) in wanted {
            match self.attach_one(name, point, path, scope, cookie) {
                Ok(link) => links.push(link),
                Err(e) => {
                    self.detach_all(links);
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    /// Attaches the arena probes of a binary, once for all its processes.
    pub(super) fn ensure_binary(&mut self, binary: &Binary) -> Result<()> {
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
        let wanted = [
            (program::ARENA_MMAP, mmap),
            (program::ARENA_MMAP_RET, mmap),
            (program::ARENA_MUNMAP, munmap),
        ]
        .map(|(name, point)| (name, point, Some(arena_size)));
        let links = self.attach_all(&binary.open_path, UProbeScope::AllProcesses, wanted)?;
        info!(
            "attached arena probes to {} (Python {}, arena {} KiB)",
            binary.display_path,
            interp.version,
            arena_size >> 10
        );
        self.binaries.insert(binary.id, links);
        Ok(())
    }

    /// Attaches the budgeted per-allocation probes of one process, with
    /// the collector's probes where the binary has them. Missing stubs only
    /// lose that source (logged); attach failures undo everything. The
    /// collector's probes are given up, not the rest, when they alone do
    /// not attach.
    pub(super) fn attach_process(&mut self, pid: u32, binary: &Binary) -> Result<GcAttach> {
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
            let probe = multi::MultiProbe {
                file_offset: point.file_offset,
                cookie,
                ref_ctr_offset: 0,
            };
            entries.push((point, probe));
            if matches!(cookie, cookie::MALLOC | cookie::CALLOC | cookie::REALLOC) {
                returns.push((point, multi::MultiProbe { cookie: 0, ..probe }));
            }
        }
        let gc = match &interp.gc {
            GcHooks::Found {
                source,
                entries: gc_entries,
                returns: gc_returns,
            } => {
                let as_probe = |p: &GcProbe| {
                    (
                        p.point,
                        multi::MultiProbe {
                            file_offset: p.point.file_offset,
                            cookie: p.cookie,
                            ref_ctr_offset: p.semaphore_offset,
                        },
                    )
                };
                let gc_entries: Vec<_> = gc_entries.iter().map(as_probe).collect();
                let gc_returns: Vec<_> = gc_returns.iter().map(as_probe).collect();
                let with_gc = |base: &[(ProbePoint, multi::MultiProbe)], gc: &[_]| {
                    base.iter().chain(gc).copied().collect::<Vec<_>>()
                };
                match self.attach_probes(
                    pid,
                    binary,
                    &with_gc(&entries, &gc_entries),
                    &with_gc(&returns, &gc_returns),
                ) {
                    Ok(links) => {
                        self.processes.insert(pid, links);
                        return Ok(GcAttach::Attached(source.clone()));
                    }
                    Err(e) => {
                        debug!("pid {pid}: the collector's probes do not attach: {e:#}");
                        GcAttach::Unavailable(format!("its probes did not attach: {e:#}"))
                    }
                }
            }
            GcHooks::Unavailable(why) => GcAttach::Unavailable(why.clone()),
        };
        let links = self.attach_probes(pid, binary, &entries, &returns)?;
        self.processes.insert(pid, links);
        Ok(gc)
    }

    fn attach_probes(
        &mut self,
        pid: u32,
        binary: &Binary,
        entries: &[(ProbePoint, multi::MultiProbe)],
        returns: &[(ProbePoint, multi::MultiProbe)],
    ) -> Result<Vec<Link>> {
        match &self.multi {
            Some(programs) => {
                let entries: Vec<_> = entries.iter().map(|(_, probe)| *probe).collect();
                let returns: Vec<_> = returns.iter().map(|(_, probe)| *probe).collect();
                Ok(programs
                    .attach(&multi::MultiAttach {
                        pid,
                        path: &binary.open_path,
                        entries: &entries,
                        returns: &returns,
                    })?
                    .into_iter()
                    .map(Link::Multi)
                    .collect())
            }
            None => {
                // Kernels without multi-uprobe links: one perf-event uprobe
                // per hook. aya cannot raise a USDT semaphore.
                if entries.iter().any(|(_, probe)| probe.ref_ctr_offset != 0) {
                    return Err(anyhow!(
                        "USDT probes with semaphores need multi-uprobe links (Linux 6.6+)"
                    ));
                }
                let scope =
                    UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
                let wanted = entries
                    .iter()
                    .map(|(point, probe)| (program::BUDGETED_ENTRY, *point, Some(probe.cookie)))
                    .chain(returns.iter().map(|(point, probe)| {
                        let cookie = (probe.cookie != 0).then_some(probe.cookie);
                        (program::RAW_ALLOC_RET, *point, cookie)
                    }));
                self.attach_all(&binary.open_path, scope, wanted)
            }
        }
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
    pub(super) fn detach_process(&mut self, pid: u32) {
        if let Some(links) = self.processes.remove(&pid) {
            self.detach_all(links);
        }
    }

    /// Detaches the arena probes of binaries no process runs any more.
    pub(super) fn retain_binaries(&mut self, in_use: impl Fn(&BinaryId) -> bool) {
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

    /// Detaches everything and waits until the kernel is done with it.
    pub(super) fn shutdown(&mut self) {
        let links: Vec<Link> = self
            .processes
            .drain()
            .flat_map(|(_, links)| links)
            .chain(self.binaries.drain().flat_map(|(_, links)| links))
            .collect();
        self.detach_all(links);
        self.reaper.finish();
    }

    pub(super) fn attached_binaries(&self) -> usize {
        self.binaries.len()
    }

    pub(super) fn probe_links(&self) -> usize {
        self.binaries.values().map(Vec::len).sum::<usize>()
            + self.processes.values().map(Vec::len).sum::<usize>()
    }
}
