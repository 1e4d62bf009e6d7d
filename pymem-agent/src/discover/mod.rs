//! Finding CPython processes: procfs for the processes, ELF analysis for the
//! interpreter binary each one runs (cached per binary inode).
pub mod cmdline;
pub mod elf;
pub mod usdt;

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use procfs::process::{MMapPath, MemoryMaps, Process};

pub use cmdline::CmdlineMode;
pub use elf::Interpreter;

/// Identity of a binary file: probes shared by all its processes are
/// attached once per inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryId {
    pub dev: u64,
    pub ino: u64,
}

/// The interpreter binary a process runs.
#[derive(Clone, Debug)]
pub struct Binary {
    pub id: BinaryId,
    /// A path the kernel can open from our namespace: `/proc/PID/map_files/…`
    /// or `/proc/PID/exe`, valid while the process lives.
    pub open_path: PathBuf,
    /// The path as the process sees it (inside its root).
    pub display_path: String,
    pub interpreter: Arc<Interpreter>,
}

/// A CPython process found in procfs.
#[derive(Clone, Debug)]
pub struct PythonProcess {
    pub pid: u32,
    /// PID inside the process's own PID namespace (innermost).
    pub ns_pid: u32,
    pub comm: String,
    /// As `--cmdline` allows it to be shown.
    pub cmdline: String,
    pub binary: Binary,
    /// When it started, in clock ticks since boot (`/proc/PID/stat`): with
    /// the pid, its identity, as pids are reused within minutes.
    pub start_ticks: u64,
}

/// Why a process is not observed.
#[derive(Debug)]
pub enum Skip {
    /// Not Python at all; not worth a log line above debug.
    NotPython(String),
    /// Looks like Python (name or libpython) but can't be observed: worth
    /// one log line.
    Unsupported(String),
    /// The interpreter library is not mapped yet (just exec'd): try again.
    NotYetMapped,
    /// The process is gone.
    Gone,
}

/// What a binary was found to be: `Err(None)`, an executable that links
/// libpython (look at its maps again); `Err(Some(reason))`, not usable.
type Analysis = Result<Arc<Interpreter>, Option<String>>;

/// Caches binary analysis per inode, so hundreds of processes running the
/// same interpreter cost one ELF read.
#[derive(Default, Clone)]
pub struct Discoverer {
    cache: Arc<Mutex<HashMap<BinaryId, Analysis>>>,
    cmdline: CmdlineMode,
}

impl Discoverer {
    /// A discoverer that keeps of each command line what `cmdline` shows.
    pub fn new(cmdline: CmdlineMode) -> Self {
        Self {
            cmdline,
            ..Self::default()
        }
    }

    /// What `pid` runs, read so that the executable, its maps and the
    /// binary analysed are one program's: a process that execs while it
    /// is read (`chroot` becoming the Python it runs) is read again.
    pub fn inspect(&self, pid: u32) -> Result<PythonProcess, Skip> {
        let exe = || std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        for _ in 0..3 {
            let before = exe();
            let found = self.inspect_once(pid);
            if exe() == before {
                return found;
            }
        }
        Err(Skip::NotYetMapped)
    }

    fn inspect_once(&self, pid: u32) -> Result<PythonProcess, Skip> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let exe_link = proc_dir.join("exe");
        let exe_target = match std::fs::read_link(&exe_link) {
            Ok(target) => target.display().to_string(),
            // Kernel threads have no exe, and stay.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && proc_dir.exists() => {
                return Err(Skip::NotPython("a kernel thread: no executable".into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Skip::Gone),
            Err(e) => return Err(Skip::NotPython(format!("no executable: {e}"))),
        };
        let process = Process::new(pid as i32).map_err(|_| Skip::Gone)?;
        let start_ticks = start_ticks(pid).ok_or(Skip::Gone)?;
        let maps = process.maps().map_err(|_| Skip::Gone)?;
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        // Every mapped libpython, then the executable: a process may map a
        // file that only looks like libpython (a copy, a truncated file).
        let mut candidates: Vec<(PathBuf, String)> = find_libpythons(&maps)
            .into_iter()
            .map(|(range, path)| (proc_dir.join("map_files").join(range), path))
            .collect();
        candidates.push((exe_link, exe_target.clone()));
        let mut reasons = Vec::new();
        let mut links_libpython = false;
        let mut found = None;
        for (open_path, display_path) in candidates {
            match self.analyze_cached(&open_path, &display_path) {
                Ok((id, interpreter)) => {
                    found = Some(Binary {
                        id,
                        open_path,
                        display_path,
                        interpreter,
                    });
                    break;
                }
                Err(None) => links_libpython = true,
                Err(Some(reason)) => reasons.push(format!("{display_path}: {reason}")),
            }
        }
        let Some(binary) = found else {
            if links_libpython {
                return Err(Skip::NotYetMapped);
            }
            // An exiting process loses its mappings before its /proc entry.
            if !is_running(pid) {
                return Err(Skip::Gone);
            }
            let looks_like_python =
                comm.contains("python") || reasons.iter().any(|r| r.contains("python"));
            let reason = reasons.join("; ");
            return Err(if looks_like_python {
                Skip::Unsupported(reason)
            } else {
                Skip::NotPython(reason)
            });
        };
        let status = process.status().map_err(|_| Skip::Gone)?;
        let ns_pid = status
            .nspid
            .as_ref()
            .and_then(|ids| ids.last().copied())
            .unwrap_or(pid as i32) as u32;
        let argv = read_cmdline(&proc_dir)
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .filter(|part| !part.is_empty())
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // What was read by path belongs to the process that started then,
        // not to a successor that took its pid meanwhile.
        if self::start_ticks(pid) != Some(start_ticks) {
            return Err(Skip::Gone);
        }
        // The one place a command line enters the agent: what is dropped
        // here is nowhere else.
        let cmdline = self.cmdline.show(&argv);
        Ok(PythonProcess {
            pid,
            ns_pid,
            comm: status.name,
            cmdline,
            binary,
            start_ticks,
        })
    }

    /// Analyses a binary once per inode. `Err(None)`: an executable that
    /// links libpython; `Err(Some(reason))`: not an interpreter we can use.
    fn analyze_cached(
        &self,
        open_path: &std::path::Path,
        display_path: &str,
    ) -> Result<(BinaryId, Arc<Interpreter>), Option<String>> {
        let meta = std::fs::metadata(open_path).map_err(|e| Some(format!("{e}")))?;
        let id = BinaryId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let name = base_name(display_path);
        if let Some(known) = self.lock().get(&id) {
            return known.clone().map(|interpreter| (id, interpreter));
        }
        // Read outside the lock: other inspections go on meanwhile.
        let analysis = match elf::analyze(open_path, name) {
            Ok(interpreter) => Ok(Arc::new(interpreter)),
            Err(e) if e.is::<elf::LinksLibpython>() => Err(None),
            // The file could not be read now (the process that showed it
            // exited): a verdict on this read, not on the binary.
            Err(e) if e.chain().any(|cause| cause.is::<std::io::Error>()) => {
                return Err(Some(format!("{e:#}")));
            }
            Err(e) => Err(Some(format!("{e:#}"))),
        };
        self.lock()
            .entry(id)
            .or_insert(analysis)
            .clone()
            .map(|interpreter| (id, interpreter))
    }

    /// The cache, even after a panic elsewhere poisoned its lock (its
    /// entries are whole values, never half-written).
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BinaryId, Analysis>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets analysis results of binaries that no longer run.
    pub fn retain(&self, keep: impl Fn(&BinaryId) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }
}

/// Every process in /proc.
pub fn all_pids() -> Vec<u32> {
    procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
        .map(|process| process.pid as u32)
        .collect()
}

/// The memory mappings of `pid`.
pub fn maps(pid: u32) -> Result<MemoryMaps> {
    Process::new(pid as i32)
        .and_then(|process| process.maps())
        .with_context(|| format!("reading maps of {pid}"))
}

/// True while `pid` exists and is neither a zombie nor dead.
pub fn is_running(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
        .unwrap_or(false)
}

/// When `pid` started, in clock ticks since boot; `None` when it is gone.
pub fn start_ticks(pid: u32) -> Option<u64> {
    Process::new(i32::try_from(pid).ok()?)
        .and_then(|p| p.stat())
        .ok()
        .map(|stat| stat.starttime)
}

/// Longest command line kept: the kernel gives all of the argument area,
/// which a process sizes itself.
const CMDLINE_MAX: u64 = 64 << 10;

fn read_cmdline(proc_dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    std::fs::File::open(proc_dir.join("cmdline"))?
        .take(CMDLINE_MAX)
        .read_to_end(&mut raw)?;
    Ok(raw)
}

/// The children of the first `MAX_TASKS` threads of `pid` (the main thread
/// first, which is the one pre-fork servers fork from), at most
/// `MAX_CHILDREN`: the processes it forked before it was tracked, whose
/// fork events the kernel did not report. Read on the observer's loop right
/// after tracking, as a read before it would leave a window for forks, so
/// bounded: a process with thousands of threads costs no more than 256
/// reads.
pub fn children(pid: u32) -> Vec<u32> {
    const MAX_CHILDREN: usize = 4096;
    const MAX_TASKS: usize = 256;
    let Ok(tasks) = Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten().take(MAX_TASKS) {
        children.extend(task.children().unwrap_or_default());
        if children.len() >= MAX_CHILDREN {
            children.truncate(MAX_CHILDREN);
            break;
        }
    }
    children
}

/// True when `pid` is a thread-group leader (a process, not a thread).
pub fn is_process(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.status())
        .map(|s| s.tgid == pid as i32)
        .unwrap_or(false)
}

fn base_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

/// `binary`'s path to open for `pid` as its maps show it now: a
/// `/proc/PID/map_files/<range>` whose mapping was split or moved since the
/// process was inspected (ld.so protecting its RELRO part) is gone, while
/// `/proc/PID/exe` stays. None when the file is no longer mapped.
pub fn current_open_path(pid: u32, binary: &Binary) -> Option<PathBuf> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if binary.open_path == proc_dir.join("exe") {
        return Some(binary.open_path.clone());
    }
    let maps = Process::new(pid as i32).ok()?.maps().ok()?;
    find_libpythons(&maps)
        .into_iter()
        .find(|(_, path)| *path == binary.display_path)
        .map(|(range, _)| proc_dir.join("map_files").join(range))
}

/// Every distinct `libpython3.X[t].so` file in a maps file, first mapping
/// of each: (`start-end` range for map_files, path).
fn find_libpythons(maps: &MemoryMaps) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    maps.iter()
        .filter_map(|map| {
            let MMapPath::Path(path) = &map.pathname else {
                return None;
            };
            let path = path.display().to_string();
            let name = base_name(&path);
            let (start, end) = map.address;
            (name.starts_with("libpython3") && name.contains(".so") && seen.insert(path.clone()))
                .then(|| (format!("{start:x}-{end:x}"), path))
        })
        .collect()
}

/// Reads the current program break of a process (end of `[heap]`), or its
/// start when it has no heap yet.
pub fn current_brk(pid: u32) -> Result<u64> {
    if let Some(heap) = maps(pid)?.iter().find(|m| m.pathname == MMapPath::Heap) {
        return Ok(heap.address.1);
    }
    let stat = Process::new(pid as i32)?.stat()?;
    match stat.start_brk {
        Some(start) => Ok(start),
        None => bail!("no heap and no start_brk for {pid}"),
    }
}

#[cfg(test)]
mod tests {
    use procfs::FromBufRead as _;

    use super::*;

    /// A binary that could not be read this time (the process that showed
    /// it exited, so its /proc path vanished) is tried again next time;
    /// one that was read is judged once.
    #[test]
    fn unreadable_binaries_are_not_judged_for_good() {
        let discoverer = Discoverer::default();
        let unreadable = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let verdict = discoverer.analyze_cached(unreadable.path(), "python3");
            assert!(matches!(verdict, Err(Some(_))), "{:?}", verdict.err());
        }
        assert!(discoverer.lock().is_empty(), "an I/O failure was cached");
        let not_python = discoverer.analyze_cached(std::path::Path::new("/bin/ls"), "ls");
        assert!(matches!(not_python, Err(Some(_))));
        assert_eq!(discoverer.lock().len(), 1, "a read binary is judged once");
    }

    #[test]
    fn finds_libpython_in_maps() {
        let find =
            |text: &str| find_libpythons(&MemoryMaps::from_buf_read(text.as_bytes()).unwrap());
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 123 /root/.pyenv/versions/3.11.7/bin/python3.11
7f1c2a000000-7f1c2a100000 r--p 00000000 fe:01 456 /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
7f1c2a100000-7f1c2a300000 r-xp 00100000 fe:01 456 /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
";
        let found = find(maps);
        assert_eq!(found.len(), 1, "one entry per file: {found:?}");
        let (range, path) = &found[0];
        assert_eq!(range, "7f1c2a000000-7f1c2a100000");
        assert!(path.ends_with("libpython3.11.so.1.0"));
        assert!(find("7f-8f r-xp 0 0:0 1 /usr/lib/libc.so.6\n").is_empty());
    }

    /// This test process, as procfs shows it.
    #[test]
    fn lists_and_reads_this_process() {
        let pid = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(children(pid).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(all_pids().contains(&pid));
        assert!(is_process(pid) && is_running(pid));
        let brk = current_brk(pid).unwrap();
        let heap = maps(pid)
            .unwrap()
            .into_iter()
            .find(|m| m.pathname == MMapPath::Heap);
        if let Some(heap) = heap {
            // The heap may grow meanwhile, never below its start.
            assert!(brk > heap.address.0, "{brk:#x}");
        }
        assert!(brk > 0);
    }

    /// A plain program (not this test binary: other tests map libpython
    /// files into it while they read them).
    #[test]
    fn a_plain_program_is_not_python() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let found = Discoverer::default().inspect(sleeper.id());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        match found {
            Err(Skip::NotPython(reason)) => assert!(reason.contains("not a CPython")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
