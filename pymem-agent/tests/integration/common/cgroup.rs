//! Memory cgroups made by tests: on the hierarchy that carries the memory
//! controller (cgroup v2 where it offers it, else v1's memory mount),
//! removed on drop with everything still in them killed, failed test or
//! not.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V2,
    V1,
}

/// The mount of the hierarchy with the memory controller.
pub fn memory_hierarchy() -> Option<(PathBuf, Version)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        let mut filesystem = after.split_whitespace();
        match filesystem.next() {
            Some("cgroup2") => {
                let controllers = Path::new(mount_point).join("cgroup.controllers");
                if fs::read_to_string(controllers)
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
                {
                    return Some((mount_point.into(), Version::V2));
                }
            }
            Some("cgroup") => {
                let options = filesystem.nth(1).unwrap_or_default();
                if options.split(',').any(|o| o == "memory") {
                    v1 = Some((mount_point.into(), Version::V1));
                }
            }
            _ => {}
        }
    }
    v1
}

/// The skip message of tests that need a memory cgroup.
pub const NO_MEMORY_HIERARCHY: &str = "SKIP: no cgroup hierarchy with the memory controller (neither cgroup2's cgroup.controllers nor a cgroup v1 mount lists memory)";

/// A fresh memory cgroup directly under the hierarchy's root.
pub struct MemoryCgroup {
    pub version: Version,
    pub dir: PathBuf,
}

impl MemoryCgroup {
    /// `pymem-test-NAME-…` with `limit` (and no swap) if given; `None`
    /// where no hierarchy carries the memory controller.
    pub fn create(name: &str, limit: Option<u64>) -> Option<Self> {
        let (root, version) = memory_hierarchy()?;
        if version == Version::V2 {
            let control = root.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                fs::write(&control, "+memory")
                    .unwrap_or_else(|e| panic!("enabling memory in {control:?}: {e}"));
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = root.join(format!(
            "pymem-test-{name}-{}-{nanos:08x}",
            std::process::id()
        ));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let cgroup = Self { version, dir };
        if let Some(limit) = limit {
            let limit = limit.to_string();
            match version {
                Version::V2 => {
                    cgroup.write("memory.max", &limit);
                    if cgroup.dir.join("memory.swap.max").exists() {
                        cgroup.write("memory.swap.max", "0");
                    }
                }
                Version::V1 => {
                    cgroup.write("memory.limit_in_bytes", &limit);
                    // Memory plus swap no larger than memory: no swap
                    // (only where swap is accounted).
                    if cgroup.dir.join("memory.memsw.limit_in_bytes").exists() {
                        cgroup.write("memory.memsw.limit_in_bytes", &limit);
                    }
                }
            }
        }
        Some(cgroup)
    }

    pub fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value).unwrap_or_else(|e| panic!("writing {value} to {path:?}: {e}"));
    }

    pub fn move_in(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p.trim() == pid.to_string()),
            "pid {pid} not in {}: {procs}",
            self.dir.display()
        );
    }

    /// The kernel's own count of OOM kills in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let text = fs::read_to_string(self.dir.join(file)).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .unwrap_or_else(|| panic!("no oom_kill in {file}: {text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// As `/proc/PID/cgroup` names it: the path below the hierarchy's
    /// mount.
    pub fn name(&self) -> String {
        format!("/{}", self.dir.file_name().unwrap().to_string_lossy())
    }

    /// Where the agent says a limit set here comes from.
    pub fn limit_source(&self) -> String {
        match self.version {
            Version::V2 => format!("cgroup v2 memory.max {}", self.dir.display()),
            Version::V1 => format!("cgroup v1 memory.limit_in_bytes {}", self.dir.display()),
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        kill_all_in(&self.dir);
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// Kills every process in the cgroup at `dir` until it is empty (for up
/// to ~5 s).
pub fn kill_all_in(dir: &Path) {
    let procs = dir.join("cgroup.procs");
    for _ in 0..50 {
        let pids = fs::read_to_string(&procs).unwrap_or_default();
        if pids.trim().is_empty() {
            return;
        }
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: a plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
