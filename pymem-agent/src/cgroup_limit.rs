//! The memory limit a process runs under: the smallest `memory.max`
//! (cgroup v2) or `memory.limit_in_bytes` (v1) of its memory cgroup and
//! that cgroup's ancestors.
//!
//! `/proc/PID/cgroup` names the cgroup relative to the reader's cgroup
//! namespace, and so do the roots of cgroup mounts in any
//! `/proc/*/mountinfo`. The agent's own cgroup mount is tried first (on the
//! host it sees every ancestor); where it does not reach the cgroup (the
//! agent in a container's namespace, the process in another container),
//! the process's own cgroup mount, through `/proc/PID/root`, shows its
//! cgroup and the ancestors inside its namespace (its container's limit).
//! Everything read here comes from files another process shapes: reads are
//! bounded and nothing panics.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// What was found of a process's memory limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimit {
    /// The process's memory cgroup, as `/proc/PID/cgroup` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The smallest memory limit of that cgroup and its ancestors
    /// (`memory.max`, or v1's `memory.limit_in_bytes`).
    #[serde(default)]
    pub limit_bytes: Option<u64>,
    /// The cgroup directory that limit was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_cgroup: Option<String>,
    /// Why `limit_bytes` is absent: no limit set, or why none could be read
    /// (the process was gone, its cgroup is out of sight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_unavailable: Option<String>,
}

/// Longest cgroup or mountinfo file read.
const MAX_LISTING_BYTES: u64 = 1 << 20;
/// Longest limit file read (a number or `max`).
const MAX_VALUE_BYTES: u64 = 64;
/// cgroup v1 writes "no limit" as the page counter's maximum in bytes
/// (0x7ffffffffffff000 with 4 KiB pages); nothing real is that large.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl Version {
    fn limit_file(self) -> &'static str {
        match self {
            Self::V1 => "memory.limit_in_bytes",
            Self::V2 => "memory.max",
        }
    }
}

/// A cgroup filesystem mount carrying the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MemoryMount {
    version: Version,
    /// The cgroup at the mount point, relative to the reader's namespace.
    root: String,
    mount_point: PathBuf,
}

/// Reads the memory limit of `pid`'s cgroup now. The process may be gone
/// (an OOM victim exits within milliseconds): then `limit_unavailable` says so.
pub fn of_process(pid: u32) -> CgroupLimit {
    let cgroups = match read_bounded(Path::new(&format!("/proc/{pid}/cgroup")), MAX_LISTING_BYTES) {
        Ok(text) => text,
        Err(e) => {
            return CgroupLimit {
                limit_unavailable: Some(format!(
                    "the process was gone before its cgroup could be read (/proc/{pid}/cgroup: {e})"
                )),
                ..CgroupLimit::default()
            };
        }
    };
    let root_of_process = PathBuf::from(format!("/proc/{pid}/root"));
    let views = [
        (PathBuf::from("/"), PathBuf::from("/proc/self/mountinfo")),
        (
            root_of_process,
            PathBuf::from(format!("/proc/{pid}/mountinfo")),
        ),
    ];
    let mut result = CgroupLimit::default();
    for (prefix, mountinfo) in views {
        let Ok(mountinfo) = read_bounded(&mountinfo, MAX_LISTING_BYTES) else {
            continue;
        };
        let Some(mount) = memory_mount(&mountinfo, &prefix) else {
            continue;
        };
        let Some(cgroup) = memory_cgroup(&cgroups, mount.version) else {
            continue;
        };
        result.cgroup = Some(cgroup.to_owned());
        let Some(dirs) = cgroup_dirs(&mount, cgroup, &prefix) else {
            continue;
        };
        let mut smallest: Option<(u64, &PathBuf)> = None;
        for dir in &dirs {
            let limit = read_bounded(&dir.join(mount.version.limit_file()), MAX_VALUE_BYTES)
                .ok()
                .and_then(|text| parse_limit(&text, mount.version));
            if let Some(limit) = limit
                && smallest.is_none_or(|(least, _)| limit < least)
            {
                smallest = Some((limit, dir));
            }
        }
        return match smallest {
            Some((limit, dir)) => CgroupLimit {
                limit_bytes: Some(limit),
                limit_cgroup: Some(dir.display().to_string()),
                ..result
            },
            None => CgroupLimit {
                limit_unavailable: Some(format!(
                    "no memory limit on cgroup {cgroup} or its ancestors"
                )),
                ..result
            },
        };
    }
    let why = match &result.cgroup {
        Some(cgroup) => {
            format!("its cgroup {cgroup} is under no cgroup mount the agent or the process can see")
        }
        None => "no memory cgroup: the memory controller is not mounted".to_string(),
    };
    CgroupLimit {
        limit_unavailable: Some(why),
        ..result
    }
}

/// Reads at most `limit` bytes of a file (procfs and cgroupfs files report
/// no size).
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The mount of `mountinfo` that carries the memory controller: a cgroup
/// v2 mount whose `cgroup.controllers` lists `memory` (read under
/// `prefix`), else a v1 mount of the memory controller.
fn memory_mount(mountinfo: &str, prefix: &Path) -> Option<MemoryMount> {
    let mounts: Vec<MemoryMount> = mountinfo.lines().filter_map(cgroup_mount).collect();
    let v2 = mounts.iter().find(|mount| {
        mount.version == Version::V2
            && read_bounded(
                &under(prefix, &mount.mount_point).join("cgroup.controllers"),
                MAX_LISTING_BYTES,
            )
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"))
    });
    v2.or_else(|| mounts.iter().find(|mount| mount.version == Version::V1))
        .cloned()
}

/// One mountinfo line as a cgroup mount: v2 always (whether it carries the
/// memory controller is for the caller), v1 only the memory controller's.
/// `36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory`
fn cgroup_mount(line: &str) -> Option<MemoryMount> {
    let (mount, filesystem) = line.split_once(" - ")?;
    let mut mount = mount.split(' ');
    let root = mount.nth(3)?;
    let mount_point = mount.next()?;
    let mut filesystem = filesystem.split(' ');
    let version = match filesystem.next()? {
        "cgroup2" => Version::V2,
        "cgroup" => {
            let options = filesystem.nth(1)?;
            if !options.split(',').any(|option| option == "memory") {
                return None;
            }
            Version::V1
        }
        _ => return None,
    };
    Some(MemoryMount {
        version,
        root: unescape(root),
        mount_point: PathBuf::from(unescape(mount_point)),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .map(|digits| {
                digits
                    .iter()
                    .fold(0u32, |value, d| value * 8 + u32::from(d - b'0'))
            })
            .and_then(|value| u8::try_from(value).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The process's cgroup in the hierarchy of `version`, from its
/// `/proc/PID/cgroup`: v2's `0::/path`, or the v1 line of the memory
/// controller (`4:memory:/path`).
fn memory_cgroup(cgroups: &str, version: Version) -> Option<&str> {
    cgroups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let hierarchy = fields.next()?;
        let controllers = fields.next()?;
        let path = fields.next()?;
        let matches = match version {
            Version::V2 => hierarchy == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        matches.then_some(path)
    })
}

/// The directories of `cgroup` and its ancestors up to the mount's root,
/// innermost first, as seen under `prefix`; `None` when the mount does not
/// reach the cgroup.
fn cgroup_dirs(mount: &MemoryMount, cgroup: &str, prefix: &Path) -> Option<Vec<PathBuf>> {
    let components = |path: &str| -> Vec<String> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect()
    };
    let root = components(&mount.root);
    let cgroup = components(cgroup);
    let below = cgroup.strip_prefix(root.as_slice())?;
    if below.iter().any(|c| c == "..") {
        return None;
    }
    let top = under(prefix, &mount.mount_point);
    Some(
        (0..=below.len())
            .rev()
            .map(|depth| {
                below[..depth]
                    .iter()
                    .fold(top.clone(), |dir, c| dir.join(c))
            })
            .collect(),
    )
}

/// `path` (absolute) under `prefix`.
fn under(prefix: &Path, path: &Path) -> PathBuf {
    prefix.join(path.strip_prefix("/").unwrap_or(path))
}

/// A limit file's value; `None` for no limit (`max`, or v1's maximum).
fn parse_limit(text: &str, version: Version) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (version == Version::V2 || value < V1_UNLIMITED_FROM).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hybrid host (this test machine's): memory on v1, a v2 mount
    /// without controllers.
    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
35 25 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
36 25 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn v1_memory_mounts_and_v2_mounts_are_found() {
        let mounts: Vec<MemoryMount> = HYBRID.lines().filter_map(cgroup_mount).collect();
        assert_eq!(
            mounts,
            [
                MemoryMount {
                    version: Version::V2,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/unified".into(),
                },
                MemoryMount {
                    version: Version::V1,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/memory".into(),
                },
            ]
        );
        // The v2 mount's cgroup.controllers is not there: v1 it is.
        let mount = memory_mount(HYBRID, Path::new("/nonexistent")).unwrap();
        assert_eq!(mount.version, Version::V1);
    }

    #[test]
    fn the_memory_line_of_proc_pid_cgroup_is_picked_per_version() {
        let hybrid = "5:devices:/\n4:memory:/pymem-oom-1/inner\n0::/user.slice\n";
        assert_eq!(
            memory_cgroup(hybrid, Version::V1),
            Some("/pymem-oom-1/inner")
        );
        assert_eq!(memory_cgroup(hybrid, Version::V2), Some("/user.slice"));
        assert_eq!(memory_cgroup("4:cpu,memory:/a\n", Version::V1), Some("/a"));
        assert_eq!(memory_cgroup("garbage\n\n::\n", Version::V1), None);
    }

    #[test]
    fn the_cgroup_and_its_ancestors_up_to_the_mount_root_are_read() {
        let host = MemoryMount {
            version: Version::V2,
            root: "/".into(),
            mount_point: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            cgroup_dirs(&host, "/kubepods/pod1/c1", Path::new("/")).unwrap(),
            [
                PathBuf::from("/sys/fs/cgroup/kubepods/pod1/c1"),
                "/sys/fs/cgroup/kubepods/pod1".into(),
                "/sys/fs/cgroup/kubepods".into(),
                "/sys/fs/cgroup".into(),
            ]
        );
        // The agent in a container's namespace: the process is outside it.
        assert_eq!(
            cgroup_dirs(&host, "/../../kubepods/pod1/c1", Path::new("/")),
            None
        );
        // The process's own mount, rooted at its container's cgroup (as
        // the agent's namespace names it), read through /proc/PID/root.
        let container = MemoryMount {
            root: "/../../kubepods/pod1/c1".into(),
            ..host.clone()
        };
        assert_eq!(
            cgroup_dirs(
                &container,
                "/../../kubepods/pod1/c1",
                Path::new("/proc/42/root")
            )
            .unwrap(),
            [PathBuf::from("/proc/42/root/sys/fs/cgroup")]
        );
        assert_eq!(
            cgroup_dirs(&container, "/../../kubepods/pod2/c2", Path::new("/")),
            None
        );
    }

    #[test]
    fn limits_parse_with_no_limit_as_none() {
        assert_eq!(parse_limit("209715200\n", Version::V2), Some(200 << 20));
        assert_eq!(parse_limit("max\n", Version::V2), None);
        assert_eq!(parse_limit("209715200\n", Version::V1), Some(200 << 20));
        assert_eq!(parse_limit("9223372036854771712\n", Version::V1), None);
        assert_eq!(parse_limit("", Version::V1), None);
        assert_eq!(parse_limit("-1", Version::V2), None);
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        assert_eq!(unescape(r"/mnt/my\040cgroups"), "/mnt/my cgroups");
        assert_eq!(unescape(r"/a\\b\9"), r"/a\\b\9");
        assert_eq!(unescape(r"\777"), r"\777");
        assert_eq!(unescape("/trailing\\"), "/trailing\\");
    }

    #[test]
    fn a_process_already_gone_says_so() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let limit = of_process(pid);
        assert_eq!(limit.limit_bytes, None);
        let why = limit.limit_unavailable.unwrap();
        assert!(why.starts_with("the process was gone"), "{why}");
    }

    /// This process's own limit reads without failing, whatever the host.
    #[test]
    fn this_process_has_a_cgroup_or_says_why_not() {
        let limit = of_process(std::process::id());
        assert!(
            limit.limit_bytes.is_some() || limit.limit_unavailable.is_some(),
            "{limit:?}"
        );
    }
}
