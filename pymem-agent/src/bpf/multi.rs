//! Multi-uprobe links (`BPF_TRACE_UPROBE_MULTI`, Linux 6.6+) for the
//! per-process probes.
//!
//! A process's probes used to be nine perf-event uprobes. Closing each of
//! those waits for RCU grace periods while holding the kernel's `event_mutex`,
//! so detaching a process over its budget took hundreds of milliseconds (its
//! probes firing meanwhile) and stopping an agent with 50 processes took
//! minutes. A multi-uprobe link puts all entry offsets of a process behind
//! one link: closing it removes the breakpoints at once, then waits for its
//! grace periods without a global lock, so links of many processes close in
//! parallel.
//!
//! aya 0.14 can neither load a program for this attach type nor create the
//! link, so this module does both with the `bpf` syscall, taking the
//! instructions from the same object, relocated against aya's maps.
use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, maps::Map};
use aya_obj::generated::{
    BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type::BPF_TRACE_UPROBE_MULTI, bpf_attr, bpf_cmd,
    bpf_insn, bpf_prog_type::BPF_PROG_TYPE_KPROBE,
};

/// The entry program (dispatching on the attach cookie) and the return
/// program of the per-process probes, loaded for multi-uprobe links.
pub struct MultiPrograms {
    entry: OwnedFd,
    ret: OwnedFd,
}

/// One process's attachment: where in which file, for which pid.
pub struct MultiAttach<'a> {
    pub pid: u32,
    pub path: &'a Path,
    pub entries: &'a [MultiProbe],
    /// Probes on the returns of the functions at these offsets.
    pub returns: &'a [MultiProbe],
}

/// One probe of a multi-uprobe link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiProbe {
    pub file_offset: u64,
    pub cookie: u64,
    /// File offset of a USDT semaphore the kernel raises while the probe
    /// is attached in the process (0: none).
    pub ref_ctr_offset: u64,
}

impl MultiPrograms {
    /// Loads `entry` and `ret` from `object` with the multi-uprobe attach
    /// type. The maps are aya's (already created from the same object), so
    /// both sets of programs share them.
    pub fn load(object: &[u8], ebpf: &Ebpf, entry: &str, ret: &str) -> Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let mut fds = Vec::new();
        for (name, map) in ebpf.maps() {
            let definition = obj
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("map {name} is not in the object"))?;
            fds.push((name, map_fd(map)?, definition));
        }
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        // Borrow juggling: relocate_maps wants the definitions while it
        // mutates the functions, so hand it copies.
        let definitions: Vec<(String, i32, aya_obj::Map)> = fds
            .into_iter()
            .map(|(name, fd, map)| (name.to_owned(), fd, map.clone()))
            .collect();
        obj.relocate_maps(
            definitions
                .iter()
                .map(|(name, fd, map)| (name.as_str(), *fd, map)),
            &text_sections,
        )
        .context("relocating map references")?;
        obj.relocate_calls(&text_sections)
            .context("relocating calls")?;
        Ok(Self {
            entry: load_program(&obj, entry)?,
            ret: load_program(&obj, ret)?,
        })
    }

    /// Creates the links of one process: one for the entries, one for the
    /// returns (when there are any).
    pub fn attach(&self, attach: &MultiAttach<'_>) -> Result<Vec<OwnedFd>> {
        let mut links = Vec::new();
        if !attach.entries.is_empty() {
            links.push(
                create_link(&self.entry, attach, attach.entries, 0)
                    .context("multi-uprobe link of the entries")?,
            );
        }
        if !attach.returns.is_empty() {
            links.push(
                create_link(&self.ret, attach, attach.returns, BPF_F_UPROBE_MULTI_RETURN)
                    .context("multi-uprobe link of the returns")?,
            );
        }
        Ok(links)
    }
}

/// The fd of one of aya's maps (only the kinds pymem defines).
fn map_fd(map: &Map) -> Result<i32> {
    let data = match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::RingBuf(data) => data,
        other => bail!("unexpected map kind {other:?}"),
    };
    Ok(data.fd().as_fd().as_raw_fd())
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a fully initialised bpf_attr; the kernel reads at most
    // its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

fn load_program(obj: &aya_obj::Object, name: &str) -> Result<OwnedFd> {
    let program = obj
        .programs
        .get(name)
        .ok_or_else(|| anyhow!("program {name} is not in the object"))?;
    let function = obj
        .functions
        .get(&program.function_key())
        .ok_or_else(|| anyhow!("program {name} has no code"))?;
    let insns: &[bpf_insn] = &function.instructions;
    let load = |log: &mut Vec<u8>| {
        // SAFETY: an all-zero bpf_attr is the documented "no options" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the BPF_PROG_LOAD member.
        let u = unsafe { &mut attr.__bindgen_anon_3 };
        u.prog_type = BPF_PROG_TYPE_KPROBE as u32;
        u.expected_attach_type = BPF_TRACE_UPROBE_MULTI as u32;
        u.insn_cnt = insns.len() as u32;
        u.insns = insns.as_ptr() as u64;
        u.license = program.license.as_ptr() as u64;
        u.kern_version = program.kernel_version.unwrap_or(0);
        for (dst, src) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if !log.is_empty() {
            u.log_level = 1;
            u.log_size = log.len() as u32;
            u.log_buf = log.as_mut_ptr() as u64;
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match load(&mut Vec::new()) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Load again with the verifier log, and keep only its end.
            let mut log = vec![0u8; 1 << 20];
            let _ = load(&mut log);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(anyhow!(
                "loading {name} for multi-uprobe links: {first} ({})",
                tail.join(" / ")
            ))
        }
    }
}

fn create_link(
    program: &OwnedFd,
    attach: &MultiAttach<'_>,
    probes: &[MultiProbe],
    flags: u32,
) -> Result<OwnedFd> {
    let path = CString::new(attach.path.as_os_str().as_bytes())?;
    let offsets: Vec<u64> = probes.iter().map(|p| p.file_offset).collect();
    let cookies: Vec<u64> = probes.iter().map(|p| p.cookie).collect();
    let ref_ctrs: Vec<u64> = probes.iter().map(|p| p.ref_ctr_offset).collect();
    let any_ref_ctr = ref_ctrs.iter().any(|&offset| offset != 0);
    // SAFETY: see load_program.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: plain integers and pointers that outlive the call.
    unsafe {
        let link = &mut attr.link_create;
        link.__bindgen_anon_1.prog_fd = program.as_raw_fd() as u32;
        link.attach_type = BPF_TRACE_UPROBE_MULTI as u32;
        let multi = &mut link.__bindgen_anon_3.uprobe_multi;
        multi.path = path.as_ptr() as u64;
        multi.offsets = offsets.as_ptr() as u64;
        multi.cookies = cookies.as_ptr() as u64;
        multi.ref_ctr_offsets = if any_ref_ctr {
            ref_ctrs.as_ptr() as u64
        } else {
            0
        };
        multi.cnt = offsets.len() as u32;
        multi.flags = flags;
        multi.pid = attach.pid;
    }
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).with_context(|| {
        format!(
            "BPF_LINK_CREATE uprobe_multi on {} for pid {}",
            attach.path.display(),
            attach.pid
        )
    })
}
