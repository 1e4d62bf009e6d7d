//! Which memory limit applies to a process, and how much of it is used.
//!
//! cgroup v2: the smallest `memory.max` of the process's cgroup and its
//! ancestors is the hard limit (the smallest `memory.high`, when set, a soft
//! one); cgroup v1: the smallest `memory.limit_in_bytes` under the memory
//! controller's mount. Without a limit (or with one above the host's
//! memory, which the host runs out of first) the host's `MemTotal` applies.
//! Usage is the limiting cgroup's `memory.current` (v2) or
//! `memory.usage_in_bytes` (v1), and `MemTotal - MemAvailable` for the host.
//!
//! The parsers are pure and take untrusted text: every value is validated,
//! garbage yields `None`. `LimitReader` reads the files (plain bounded
//! reads, never maps) once per cgroup directory per sample tick, so the
//! processes of one pod share one read of their cgroups.
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
};

/// Values at or above this (4 EiB) mean "no limit": cgroup v1 writes its
/// unlimited as `LONG_MAX` rounded down to a page (9223372036854771712 with
/// 4 KiB pages), and no machine has that much memory.
const V1_UNLIMITED: u64 = 1 << 62;
/// Longest value file read (`memory.max` and friends hold one number).
const VALUE_FILE_MAX: u64 = 256;
/// Longest `/proc/PID/cgroup` and `/proc/meminfo` read.
const PROC_FILE_MAX: u64 = 64 << 10;
/// Longest `/proc/self/mountinfo` read (hosts with many containers have
/// long ones; the agent's own mount namespace is usually short).
const MOUNTINFO_MAX: u64 = 4 << 20;

/// The memory limit that applies to one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub limit_bytes: u64,
    /// The cgroup directory whose limit this is (`None` for the host's).
    pub cgroup_dir: Option<PathBuf>,
    /// `cgroup v2 memory.max /sys/fs/cgroup/…`, `cgroup v1
    /// memory.limit_in_bytes /sys/fs/cgroup/memory/…` or `host`.
    pub source: String,
    /// The smallest `memory.high` up the hierarchy, when below the limit.
    pub high_bytes: Option<u64>,
    /// Usage of the cgroup whose limit applies (the host's for `host`).
    pub usage_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupVersion {
    V2,
    V1,
}

impl CgroupVersion {
    fn limit_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.max",
            Self::V1 => "memory.limit_in_bytes",
        }
    }

    fn usage_file(self) -> &'static str {
        match self {
            Self::V2 => "memory.current",
            Self::V1 => "memory.usage_in_bytes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V2 => "cgroup v2",
            Self::V1 => "cgroup v1",
        }
    }
}

/// A mounted cgroup hierarchy that can hold memory limits: cgroup2, or a
/// cgroup v1 hierarchy with the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub version: CgroupVersion,
    /// The cgroup the mount shows at its mount point, relative to the
    /// agent's cgroup namespace (`/`, or `/../..` for the host's hierarchy
    /// seen from a container).
    pub root: String,
    pub mount_point: PathBuf,
}

/// The memory cgroups of one process, from `/proc/PID/cgroup`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessCgroups {
    /// The cgroup v2 path (`0::/path`).
    pub unified: Option<String>,
    /// The cgroup v1 path of the hierarchy holding the memory controller.
    pub memory_v1: Option<String>,
}

/// A limit value: `max` is none, else a decimal byte count.
pub fn parse_v2_limit(text: &str) -> Option<Option<u64>> {
    let text = text.trim();
    if text == "max" {
        return Some(None);
    }
    parse_bytes(text).map(Some)
}

/// A cgroup v1 limit: huge values are none.
pub fn parse_v1_limit(text: &str) -> Option<Option<u64>> {
    let bytes = parse_bytes(text.trim())?;
    Some((bytes < V1_UNLIMITED).then_some(bytes))
}

/// A decimal byte count and nothing else (no sign, no unit, at most 20
/// digits: u64's range is checked by the parse).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut words = rest.split_whitespace();
            let value = parse_bytes(words.next()?)?;
            match (words.next(), words.next()) {
                (Some("kB"), None) => value.checked_mul(1024),
                (None, None) => Some(value),
                _ => None,
            }
        })
    };
    let total = field("MemTotal").filter(|&total| total > 0)?;
    let available = field("MemAvailable")?.min(total);
    Some((total, available))
}

/// The memory cgroups in `/proc/PID/cgroup` (`ID:controllers:path` lines).
/// Lines that do not parse are skipped.
pub fn parse_proc_cgroup(text: &str) -> ProcessCgroups {
    let mut cgroups = ProcessCgroups::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.starts_with('/') || id.parse::<u32>().is_err() {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            cgroups.unified = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            cgroups.memory_v1 = Some(path.to_owned());
        }
    }
    cgroups
}

/// The cgroup mounts that can hold memory limits, from
/// `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let super_options = after.nth(1).unwrap_or("");
            let version = match fs_type {
                "cgroup2" => CgroupVersion::V2,
                "cgroup" if super_options.split(',').any(|o| o == "memory") => CgroupVersion::V1,
                _ => return None,
            };
            Some(CgroupMount {
                version,
                root: unescape_mountinfo(root)?,
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)?),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Option<String> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes.get(i + 1..i + 4)?;
            if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                return None;
            }
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).ok()?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The directory of `cgroup` (a path from `/proc/PID/cgroup`) under
/// `mount`, when the mount shows it: the mount's root must be an ancestor
/// of the cgroup, and the rest must not climb (`..`) out of the mount.
pub fn cgroup_dir(mount: &CgroupMount, cgroup: &str) -> Option<PathBuf> {
    let components = |path: &str| -> Vec<String> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect()
    };
    let root = components(&mount.root);
    let path = components(cgroup);
    let rest = path.strip_prefix(root.as_slice())?;
    if rest.iter().any(|c| c == "..") {
        return None;
    }
    let mut dir = mount.mount_point.clone();
    dir.extend(rest);
    Some(dir)
}

/// The smallest limits found from one cgroup up to its hierarchy's root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ChainLimits {
    /// The smallest hard limit and the directory that sets it.
    max: Option<(u64, PathBuf)>,
    /// The smallest `memory.high` (cgroup v2 only).
    high: Option<u64>,
}

/// Reads the limits of processes, caching per cgroup directory until the
/// next `start_tick`.
#[derive(Debug)]
pub struct LimitReader {
    /// Where `/proc` and the cgroup mounts are (`/` but in tests).
    mounts: Vec<CgroupMount>,
    proc_dir: PathBuf,
    chains: HashMap<(CgroupVersion, PathBuf), ChainLimits>,
    usage: HashMap<(CgroupVersion, PathBuf), Option<u64>>,
    /// `/proc/meminfo` of this tick, read when first needed.
    meminfo: Option<Option<(u64, u64)>>,
}

impl LimitReader {
    /// Finds the cgroup mounts in the agent's mount namespace (read once:
    /// cgroup hierarchies are mounted at boot).
    pub fn new() -> Self {
        let mounts = read_bounded(Path::new("/proc/self/mountinfo"), MOUNTINFO_MAX)
            .map(|text| parse_mountinfo(&text))
            .unwrap_or_default();
        Self::with(mounts, PathBuf::from("/proc"))
    }

    /// A reader of these mounts and this `/proc` (tests give directories
    /// of their own).
    pub fn with(mounts: Vec<CgroupMount>, proc_dir: PathBuf) -> Self {
        Self {
            mounts,
            proc_dir,
            chains: HashMap::new(),
            usage: HashMap::new(),
            meminfo: None,
        }
    }

    /// Forgets what was read: limits and usage change between ticks.
    pub fn start_tick(&mut self) {
        self.chains.clear();
        self.usage.clear();
        self.meminfo = None;
    }

    /// The limit of process `pid`; `None` when it cannot be known: its
    /// `/proc/PID/cgroup` or `/proc/meminfo` cannot be read, or its cgroup
    /// is not under any cgroup mount the agent sees (a container's own
    /// cgroup namespace hides the other pods' cgroups).
    pub fn of_process(&mut self, pid: u32) -> Option<MemoryLimit> {
        let cgroups = self.cgroups_of(pid)?;
        self.of_cgroups(&cgroups)
    }

    /// The memory cgroups `/proc/PID/cgroup` names; `None` when the
    /// process is gone.
    pub fn cgroups_of(&self, pid: u32) -> Option<ProcessCgroups> {
        let text = read_bounded(
            &self.proc_dir.join(pid.to_string()).join("cgroup"),
            PROC_FILE_MAX,
        )?;
        Some(parse_proc_cgroup(&text))
    }

    pub fn of_cgroups(&mut self, cgroups: &ProcessCgroups) -> Option<MemoryLimit> {
        let mut limiting: Option<(u64, CgroupVersion, PathBuf)> = None;
        let mut high: Option<u64> = None;
        for (version, path) in [
            (CgroupVersion::V2, &cgroups.unified),
            (CgroupVersion::V1, &cgroups.memory_v1),
        ] {
            let Some(path) = path else { continue };
            // The kernel lists the cgroup v2 path even where cgroup2 is not
            // mounted: only a hierarchy the agent has mounted counts.
            if !self.mounts.iter().any(|mount| mount.version == version) {
                continue;
            }
            // Out of sight, its limits are unknown: not the host's.
            let (dir, mount_point) = self.resolve(version, path)?;
            let chain = self.chain(version, &dir, &mount_point);
            if let Some((bytes, at)) = chain.max
                && limiting.as_ref().is_none_or(|(min, ..)| bytes < *min)
            {
                limiting = Some((bytes, version, at));
            }
            high = min_option(high, chain.high);
        }
        let host = self.meminfo();
        let host_total = host.map(|(total, _)| total);
        // The host runs out before a cgroup limit above its memory is met.
        let limiting = limiting.filter(|(bytes, ..)| host_total.is_none_or(|total| *bytes < total));
        let limit = match limiting {
            Some((bytes, version, dir)) => MemoryLimit {
                limit_bytes: bytes,
                source: format!(
                    "{} {} {}",
                    version.name(),
                    version.limit_file(),
                    dir.display()
                ),
                high_bytes: None,
                usage_bytes: self.usage(version, &dir),
                cgroup_dir: Some(dir),
            },
            None => {
                let (total, available) = host?;
                MemoryLimit {
                    limit_bytes: total,
                    source: "host".to_owned(),
                    high_bytes: None,
                    usage_bytes: Some(total - available),
                    cgroup_dir: None,
                }
            }
        };
        Some(MemoryLimit {
            high_bytes: high.filter(|&high| high < limit.limit_bytes),
            ..limit
        })
    }

    /// The directory of `path` in the first mount of `version` that shows
    /// it, with that mount's mount point.
    fn resolve(&self, version: CgroupVersion, path: &str) -> Option<(PathBuf, PathBuf)> {
        self.mounts
            .iter()
            .filter(|mount| mount.version == version)
            .find_map(|mount| {
                let dir = cgroup_dir(mount, path)?;
                dir.is_dir().then(|| (dir, mount.mount_point.clone()))
            })
    }

    /// The smallest limits of `dir` and its ancestors up to `mount_point`,
    /// each directory's read once per tick.
    fn chain(&mut self, version: CgroupVersion, dir: &Path, mount_point: &Path) -> ChainLimits {
        let key = (version, dir.to_path_buf());
        if let Some(known) = self.chains.get(&key) {
            return known.clone();
        }
        let parent = match dir.parent() {
            Some(parent) if dir != mount_point && parent.starts_with(mount_point) => {
                self.chain(version, parent, mount_point)
            }
            _ => ChainLimits::default(),
        };
        let own_max = read_value(&dir.join(version.limit_file())).and_then(|text| match version {
            CgroupVersion::V2 => parse_v2_limit(&text)?,
            CgroupVersion::V1 => parse_v1_limit(&text)?,
        });
        let own_high = match version {
            CgroupVersion::V2 => read_value(&dir.join("memory.high"))
                .and_then(|text| parse_v2_limit(&text))
                .flatten(),
            CgroupVersion::V1 => None,
        };
        let max = match (own_max, parent.max) {
            (Some(own), Some((inherited, at))) if inherited <= own => Some((inherited, at)),
            (Some(own), _) => Some((own, dir.to_path_buf())),
            (None, inherited) => inherited,
        };
        let chain = ChainLimits {
            max,
            high: min_option(own_high, parent.high),
        };
        self.chains.insert(key, chain.clone());
        chain
    }

    fn usage(&mut self, version: CgroupVersion, dir: &Path) -> Option<u64> {
        *self
            .usage
            .entry((version, dir.to_path_buf()))
            .or_insert_with(|| {
                read_value(&dir.join(version.usage_file())).and_then(|text| parse_bytes(&text))
            })
    }

    fn meminfo(&mut self) -> Option<(u64, u64)> {
        let proc_dir = &self.proc_dir;
        *self.meminfo.get_or_insert_with(|| {
            read_bounded(&proc_dir.join("meminfo"), PROC_FILE_MAX)
                .and_then(|text| parse_meminfo(&text))
        })
    }
}

impl LimitReader {
    /// The limit of an OOM victim now, for its post-mortem: read at once,
    /// as the process is about to vanish, and saying why when it cannot be
    /// known.
    /// The limit an OOM victim was killed under. `last_seen` is what its
    /// `/proc/PID/cgroup` said while it ran: a dying process may no longer
    /// show its cgroup (cgroup v1 shows exiting tasks in the root), or be
    /// gone.
    pub fn at_kill(&mut self, pid: u32, last_seen: Option<&ProcessCgroups>) -> CgroupLimit {
        let path = self.proc_dir.join(pid.to_string()).join("cgroup");
        let now = self.cgroups_of(pid);
        let cgroups = match (now, last_seen) {
            (Some(now), Some(seen)) => ProcessCgroups {
                unified: now.unified.or_else(|| seen.unified.clone()),
                // The kernel shows an exiting task of a v1 hierarchy in its
                // root: the last place seen is where it lived.
                memory_v1: match now.memory_v1 {
                    Some(root) if root == "/" => seen.memory_v1.clone().or(Some(root)),
                    other => other.or_else(|| seen.memory_v1.clone()),
                },
            },
            (Some(now), None) => now,
            (None, Some(seen)) => seen.clone(),
            (None, None) => {
                return CgroupLimit {
                    limit_unavailable: Some(format!(
                        "the process was gone before its cgroup could be read ({})",
                        path.display()
                    )),
                    ..CgroupLimit::default()
                };
            }
        };
        let cgroup = cgroups.memory_v1.clone().or(cgroups.unified.clone());
        let limit = self.of_cgroups(&cgroups);
        match limit {
            Some(MemoryLimit {
                limit_bytes,
                cgroup_dir: Some(dir),
                ..
            }) => CgroupLimit {
                cgroup,
                limit_bytes: Some(limit_bytes),
                limit_cgroup: Some(dir.display().to_string()),
                limit_unavailable: None,
            },
            Some(host) => CgroupLimit {
                limit_unavailable: Some(format!(
                    "no cgroup memory limit below the host's {} bytes",
                    host.limit_bytes
                )),
                cgroup,
                ..CgroupLimit::default()
            },
            None => CgroupLimit {
                limit_unavailable: Some(match &cgroup {
                    Some(cgroup) => {
                        format!("its cgroup {cgroup} is under no cgroup mount the agent can see")
                    }
                    None => "no memory cgroup: the memory controller is not mounted".into(),
                }),
                cgroup,
                ..CgroupLimit::default()
            },
        }
    }
}

/// What was found of an OOM victim's memory limit.
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

impl Default for LimitReader {
    fn default() -> Self {
        Self::new()
    }
}

fn min_option(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn read_value(path: &Path) -> Option<String> {
    read_bounded(path, VALUE_FILE_MAX)
}

/// At most `max` bytes of `path` as text; `None` if it cannot be read or
/// is not UTF-8.
fn read_bounded(path: &Path, max: u64) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(max)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn limit_values_parse_and_garbage_does_not() {
        assert_eq!(parse_v2_limit("max\n"), Some(None));
        assert_eq!(parse_v2_limit("314572800\n"), Some(Some(314_572_800)));
        assert_eq!(parse_v2_limit("0"), Some(Some(0)));
        assert_eq!(parse_v2_limit("18446744073709551615"), Some(Some(u64::MAX)));
        for garbage in [
            "",
            "-1",
            "+5",
            "12 34",
            "1e9",
            "18446744073709551616",
            "99999999999999999999999",
            "max max",
            "0x10",
            "١٢٣",
        ] {
            assert_eq!(parse_v2_limit(garbage), None, "{garbage:?}");
        }
        assert_eq!(parse_v1_limit("9223372036854771712\n"), Some(None));
        assert_eq!(
            parse_v1_limit("9223372036854710272"),
            Some(None),
            "64K pages"
        );
        assert_eq!(parse_v1_limit("314572800"), Some(Some(314_572_800)));
        assert_eq!(parse_v1_limit("max"), None, "v1 has no max");
    }

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        let text = "MemTotal:       24684084 kB\nMemFree:        23000000 kB\nMemAvailable:   24147840 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24_684_084 * 1024, 24_147_840 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 10 kB\n"), None, "no MemAvailable");
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\n"),
            Some((10240, 10240)),
            "available is capped at the total"
        );
        assert_eq!(
            parse_meminfo("MemTotal: 99999999999999999999 kB\nMemAvailable: 1 kB\n"),
            None
        );
        assert_eq!(
            parse_meminfo("MemTotal: 18446744073709551615 kB\nMemAvailable: 1 kB\n"),
            None,
            "overflows in bytes"
        );
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 5 MB\nMemAvailable: 1 kB\n"), None);
        assert_eq!(parse_meminfo("\u{0}\u{1}garbage"), None);
    }

    #[test]
    fn proc_cgroup_gives_the_unified_and_the_v1_memory_path() {
        let hybrid = "12:memory:/kubepods/pod1/abc\n11:cpu,cpuacct:/kubepods/pod1/abc\n1:name=systemd:/kubepods/pod1/abc\n0::/kubepods/pod1/abc\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            ProcessCgroups {
                unified: Some("/kubepods/pod1/abc".into()),
                memory_v1: Some("/kubepods/pod1/abc".into()),
            }
        );
        assert_eq!(
            parse_proc_cgroup("0::/../../kubepods.slice/x.scope\n").unified,
            Some("/../../kubepods.slice/x.scope".into())
        );
        assert_eq!(
            parse_proc_cgroup("4:cpu,memory:/a:b\n").memory_v1,
            Some("/a:b".into()),
            "a colon in the path"
        );
        for garbage in [
            "",
            "0::relative\n",
            "x::/a\n",
            "0:/a\n",
            "::\n",
            "4:memoryx:/a\n",
        ] {
            assert_eq!(
                parse_proc_cgroup(garbage),
                ProcessCgroups::default(),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn mountinfo_finds_cgroup2_and_the_v1_memory_hierarchy() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
900 800 0:38 /../../.. /host/sys/fs/cgroup ro,relatime master:3 - cgroup2 cgroup2 rw,nsdelegate
901 800 0:38 / /with\\040space rw - cgroup2 cgroup2 rw
garbage line
";
        let mounts = parse_mountinfo(text);
        let summary: Vec<(CgroupVersion, &str, &str)> = mounts
            .iter()
            .map(|m| (m.version, m.root.as_str(), m.mount_point.to_str().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [
                (CgroupVersion::V1, "/", "/sys/fs/cgroup/memory"),
                (CgroupVersion::V2, "/", "/sys/fs/cgroup/unified"),
                (CgroupVersion::V2, "/../../..", "/host/sys/fs/cgroup"),
                (CgroupVersion::V2, "/", "/with space"),
            ]
        );
        assert_eq!(unescape_mountinfo("a\\04"), None, "cut escape");
        assert_eq!(unescape_mountinfo("a\\999"), None, "not octal");
        assert_eq!(unescape_mountinfo("a\\777"), None, "over a byte");
    }

    #[test]
    fn cgroup_dirs_are_found_under_a_mount_that_shows_them() {
        let mount = |root: &str, at: &str| CgroupMount {
            version: CgroupVersion::V2,
            root: root.into(),
            mount_point: at.into(),
        };
        let own = mount("/", "/sys/fs/cgroup");
        let host = mount("/../../..", "/host/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(&own, "/pod/app"),
            Some("/sys/fs/cgroup/pod/app".into())
        );
        assert_eq!(cgroup_dir(&own, "/"), Some("/sys/fs/cgroup".into()));
        // A pod's process seen from the agent's own cgroup namespace: only
        // the host's hierarchy shows it.
        let pod = "/../../../kubepods.slice/cri-containerd-x.scope";
        assert_eq!(cgroup_dir(&own, pod), None);
        assert_eq!(
            cgroup_dir(&host, pod),
            Some("/host/sys/fs/cgroup/kubepods.slice/cri-containerd-x.scope".into())
        );
        assert_eq!(cgroup_dir(&host, "/agent"), None, "not under that root");
        assert_eq!(cgroup_dir(&own, "/a/../../etc"), None);
        assert_eq!(
            cgroup_dir(&mount("/sub", "/mnt"), "/sub/x"),
            Some("/mnt/x".into())
        );
        assert_eq!(cgroup_dir(&mount("/sub", "/mnt"), "/subx"), None);
    }

    /// A cgroup tree and a /proc in a temporary directory.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new(meminfo_kib: (u64, u64)) -> Self {
            let tree = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            tree.write(
                "proc/meminfo",
                &format!(
                    "MemTotal: {} kB\nMemAvailable: {} kB\n",
                    meminfo_kib.0, meminfo_kib.1
                ),
            );
            tree
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative)
        }

        fn write(&self, relative: &str, text: &str) {
            let path = self.path(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }

        fn reader(&self) -> LimitReader {
            let mount = |version, at: &str| CgroupMount {
                version,
                root: "/".into(),
                mount_point: self.path(at),
            };
            LimitReader::with(
                vec![
                    mount(CgroupVersion::V2, "cg2"),
                    mount(CgroupVersion::V1, "memory"),
                ],
                self.path("proc"),
            )
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_smallest_max_up_the_hierarchy_applies_with_its_usage() {
        let tree = Tree::new((16 << 20, 12 << 20));
        tree.write("cg2/kubepods/memory.max", "max\n");
        tree.write("cg2/kubepods/memory.current", "5000000000\n");
        tree.write("cg2/kubepods/pod/memory.max", &format!("{}\n", 2 * GIB));
        tree.write("cg2/kubepods/pod/memory.high", &format!("{}\n", GIB));
        tree.write("cg2/kubepods/pod/memory.current", "123456789\n");
        tree.write("cg2/kubepods/pod/app/memory.max", &format!("{}\n", 3 * GIB));
        tree.write("cg2/kubepods/pod/app/memory.high", "max\n");
        tree.write("cg2/kubepods/pod/app/memory.current", "1000\n");
        tree.write("proc/42/cgroup", "0::/kubepods/pod/app\n");
        let mut reader = tree.reader();
        reader.start_tick();
        assert_eq!(
            reader.of_process(42),
            Some(MemoryLimit {
                limit_bytes: 2 * GIB,
                source: format!(
                    "cgroup v2 memory.max {}",
                    tree.path("cg2/kubepods/pod").display()
                ),
                high_bytes: Some(GIB),
                usage_bytes: Some(123_456_789),
                cgroup_dir: Some(tree.path("cg2/kubepods/pod")),
            })
        );
    }

    /// An OOM victim's limit: the cgroup it was killed in, or why not.
    #[test]
    fn a_victims_limit_names_its_cgroup_or_why_it_has_none() {
        let tree = Tree::new((16 << 20, 12 << 20));
        tree.write("memory/svc/memory.limit_in_bytes", "314572800\n");
        tree.write("proc/7/cgroup", "4:memory:/svc\n0::/\n");
        tree.write("cg2/user/memory.max", "max\n");
        tree.write("proc/8/cgroup", "0::/user\n");
        let mut reader = tree.reader();
        reader.start_tick();
        let limited = reader.at_kill(7, None);
        assert_eq!(limited.limit_bytes, Some(314_572_800));
        assert_eq!(limited.cgroup.as_deref(), Some("/svc"));
        let dir = tree.path("memory/svc").display().to_string();
        assert_eq!(limited.limit_cgroup.as_deref(), Some(dir.as_str()));
        let unlimited = reader.at_kill(8, None);
        assert_eq!(unlimited.limit_bytes, None);
        assert!(
            unlimited
                .limit_unavailable
                .unwrap()
                .contains("below the host's"),
        );
        let gone = reader.at_kill(9, None);
        assert!(gone.limit_unavailable.unwrap().contains("was gone"));

        // Dying, a v1 task shows in the root, or its /proc entry is gone:
        // where it was last seen is where it was killed.
        let seen = parse_proc_cgroup("4:memory:/svc\n0::/\n");
        tree.write("proc/10/cgroup", "4:memory:/\n0::/\n");
        for pid in [10, 11] {
            let dying = reader.at_kill(pid, Some(&seen));
            assert_eq!(dying.cgroup.as_deref(), Some("/svc"), "pid {pid}");
            assert_eq!(dying.limit_bytes, Some(314_572_800), "pid {pid}");
        }
        // A move seen at the kill is believed.
        tree.write("proc/12/cgroup", "4:memory:/other\n0::/\n");
        assert_eq!(
            reader.at_kill(12, Some(&seen)).cgroup.as_deref(),
            Some("/other")
        );
    }

    #[test]
    fn no_limit_or_one_above_the_host_is_the_host() {
        let tree = Tree::new((16 << 20, 12 << 20));
        let host = MemoryLimit {
            limit_bytes: 16 * GIB,
            source: "host".into(),
            high_bytes: None,
            usage_bytes: Some(4 * GIB),
            cgroup_dir: None,
        };
        tree.write("cg2/user/memory.max", "max\n");
        tree.write("proc/1/cgroup", "0::/user\n");
        tree.write("cg2/big/memory.max", &format!("{}\n", 64 * GIB));
        tree.write("cg2/big/memory.high", &format!("{}\n", 8 * GIB));
        tree.write("proc/2/cgroup", "0::/big\n");
        tree.write("proc/3/cgroup", "0::/gone\n");
        tree.write("proc/4/cgroup", "");
        let mut reader = tree.reader();
        reader.start_tick();
        assert_eq!(reader.of_process(1), Some(host.clone()));
        assert_eq!(
            reader.of_process(2),
            Some(MemoryLimit {
                high_bytes: Some(8 * GIB),
                ..host.clone()
            }),
            "a soft limit below the host's memory is still reported"
        );
        assert_eq!(reader.of_process(4), Some(host.clone()), "no cgroup at all");
        assert_eq!(reader.of_process(3), None, "its cgroup is out of sight");
        assert_eq!(reader.of_process(5), None, "process gone");
    }

    #[test]
    fn a_hierarchy_that_is_not_mounted_is_ignored() {
        let tree = Tree::new((16 << 20, 12 << 20));
        tree.write("memory/svc/memory.limit_in_bytes", "314572800\n");
        tree.write("proc/7/cgroup", "4:memory:/svc\n0::/not/mounted\n");
        let mut reader = LimitReader::with(
            vec![CgroupMount {
                version: CgroupVersion::V1,
                root: "/".into(),
                mount_point: tree.path("memory"),
            }],
            tree.path("proc"),
        );
        reader.start_tick();
        assert_eq!(reader.of_process(7).unwrap().limit_bytes, 314_572_800);
    }

    #[test]
    fn cgroup_v1_limits_and_garbage_files() {
        let tree = Tree::new((16 << 20, 12 << 20));
        tree.write("memory/memory.limit_in_bytes", "9223372036854771712\n");
        tree.write("memory/svc/memory.limit_in_bytes", "314572800\n");
        tree.write("memory/svc/memory.usage_in_bytes", "1048576\n");
        tree.write("proc/7/cgroup", "4:memory:/svc\n0::/\n");
        tree.write("cg2/bad/memory.max", "lots\n");
        tree.write("cg2/bad/memory.current", "-5\n");
        tree.write("cg2/bad/inner/memory.max", "1000\n");
        tree.write("cg2/bad/inner/memory.current", "\u{0}\u{0}\u{ff}");
        tree.write("proc/8/cgroup", "0::/bad/inner\n");
        tree.write("proc/9/cgroup", "0::/bad\n");
        let mut reader = tree.reader();
        reader.start_tick();
        assert_eq!(
            reader.of_process(7),
            Some(MemoryLimit {
                limit_bytes: 314_572_800,
                source: format!(
                    "cgroup v1 memory.limit_in_bytes {}",
                    tree.path("memory/svc").display()
                ),
                high_bytes: None,
                usage_bytes: Some(1_048_576),
                cgroup_dir: Some(tree.path("memory/svc")),
            })
        );
        let inner = reader.of_process(8).unwrap();
        assert_eq!((inner.limit_bytes, inner.usage_bytes), (1000, None));
        assert_eq!(reader.of_process(9).unwrap().source, "host");
    }

    #[test]
    fn files_are_read_once_per_tick() {
        let tree = Tree::new((16 << 20, 12 << 20));
        tree.write("cg2/pod/memory.max", "1000000\n");
        tree.write("cg2/pod/memory.current", "1000\n");
        tree.write("proc/1/cgroup", "0::/pod\n");
        tree.write("proc/2/cgroup", "0::/pod\n");
        let mut reader = tree.reader();
        reader.start_tick();
        assert_eq!(reader.of_process(1).unwrap().usage_bytes, Some(1000));
        tree.write("cg2/pod/memory.current", "2000\n");
        assert_eq!(
            reader.of_process(2).unwrap().usage_bytes,
            Some(1000),
            "same tick: the cached read"
        );
        reader.start_tick();
        assert_eq!(reader.of_process(2).unwrap().usage_bytes, Some(2000));
    }
}
