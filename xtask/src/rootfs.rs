//! `cargo xtask rootfs`: minimal Debian root filesystems with a given Python,
//! for tests of interpreters in other distributions (run through chroot).
use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use clap::ValueEnum;

use crate::{process, setup};

/// Written last, with the suite and its packages: a directory without it is
/// a failed or interrupted build, one with other packages an outdated one.
const COMPLETE_MARKER: &str = ".pymem-rootfs-complete";
/// Installed beside the interpreter in every suite: numpy exercises
/// extension-buffer tracking (PyTraceMalloc_Track) in the interpreter matrix.
const EXTRA_PACKAGES: &[&str] = &["python3-numpy"];

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SuiteArg {
    Bullseye,
    Trixie,
    Sid,
    /// All of the above.
    All,
}

#[derive(Clone, Copy, Debug)]
struct Suite {
    name: &'static str,
    /// The suite's versioned interpreter package.
    python_package: &'static str,
}

const BULLSEYE: Suite = Suite {
    name: "bullseye",
    python_package: "python3.9",
};
const TRIXIE: Suite = Suite {
    name: "trixie",
    python_package: "python3.13",
};
const SID: Suite = Suite {
    name: "sid",
    python_package: "python3.14",
};

impl Suite {
    /// Everything installed beyond minbase, as debootstrap's --include.
    fn packages(&self) -> String {
        std::iter::once(self.python_package)
            .chain(EXTRA_PACKAGES.iter().copied())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn marker(&self) -> String {
        format!("{} {}\n", self.name, self.packages())
    }
}

impl SuiteArg {
    fn suites(self) -> Vec<Suite> {
        match self {
            SuiteArg::Bullseye => vec![BULLSEYE],
            SuiteArg::Trixie => vec![TRIXIE],
            SuiteArg::Sid => vec![SID],
            SuiteArg::All => vec![BULLSEYE, TRIXIE, SID],
        }
    }
}

/// Builds the requested root filesystems; prints each path on stdout
/// (progress goes to stderr, so `$(cargo xtask rootfs sid)` is the path).
pub fn run(arg: SuiteArg) -> Result<()> {
    for suite in arg.suites() {
        let dir = ensure_rootfs(suite)?;
        println!("{}", dir.display());
    }
    Ok(())
}

fn rootfs_dir(suite_name: &str) -> PathBuf {
    test_interpreters::rootfs_dir().join(suite_name)
}

fn ensure_rootfs(suite: Suite) -> Result<PathBuf> {
    let dir = rootfs_dir(suite.name);
    let marker = dir.join(COMPLETE_MARKER);
    match fs::read_to_string(&marker) {
        Ok(found) if found == suite.marker() => {
            eprintln!("rootfs {}: present", suite.name);
            return Ok(dir);
        }
        Ok(found) => eprintln!(
            "rootfs {}: built with {:?}, now wants {:?}: rebuilding",
            suite.name,
            found.trim(),
            suite.marker().trim()
        ),
        Err(_) => {}
    }
    ensure!(
        process::is_root(),
        "debootstrap must run as root (try `sudo -E cargo xtask rootfs {}`)",
        suite.name
    );
    if dir.exists() {
        eprintln!(
            "rootfs {}: removing a half-built {}",
            suite.name,
            dir.display()
        );
        remove_partial_rootfs(&dir)?;
    }
    if !process::on_path("debootstrap") {
        setup::ensure_apt_packages(&["debootstrap"]);
    }
    eprintln!(
        "rootfs {}: debootstrap with {} into {}",
        suite.name,
        suite.packages(),
        dir.display()
    );
    debootstrap(suite, &dir)?;
    fs::write(marker, suite.marker())?;
    Ok(dir)
}

fn debootstrap(suite: Suite, dir: &Path) -> Result<()> {
    let mirror = debian_mirror()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    process::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", suite.packages()))
            .arg(suite.name)
            .arg(dir)
            .arg(&mirror)
            // Keep stdout for the path we print.
            .stdout(io::stderr()),
    )
    .with_context(|| {
        format!(
            "debootstrap of {} failed; the next run deletes {} and starts again",
            suite.name,
            dir.display()
        )
    })
}

/// An interrupted debootstrap can leave proc/sys mounted inside the target:
/// unmount those first, or deleting the tree would reach into the host's.
fn remove_partial_rootfs(dir: &Path) -> Result<()> {
    for mount_point in mounts_below(dir)? {
        process::run(Command::new("umount").arg("--lazy").arg(&mount_point))?;
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Mount points inside `dir`, deepest first.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let mut below: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|mount_point| mount_point.starts_with(dir) && mount_point != dir)
        .collect();
    below.sort_by_key(|mount_point| std::cmp::Reverse(mount_point.components().count()));
    Ok(below)
}

/// Where this machine's apt gets Debian's main archive: the first archive
/// URI (not the security one) of an enabled source, so that the root
/// filesystems come from the same mirror as the host's own packages.
fn debian_mirror() -> Result<String> {
    let mut sources = Vec::new();
    if let Ok(list) = fs::read_to_string("/etc/apt/sources.list") {
        sources.push(list);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "list" || ext == "sources")
            })
            .collect();
        files.sort();
        sources.extend(
            files
                .iter()
                .filter_map(|path| fs::read_to_string(path).ok()),
        );
    }
    sources
        .iter()
        .find_map(|text| debian_archive_uri(text))
        .context("no Debian archive in /etc/apt/sources.list or /etc/apt/sources.list.d/*.{list,sources}: cannot choose a mirror for debootstrap")
}

/// The first Debian main-archive URI in one apt source file, one-line
/// (`deb URI suite …`) or deb822 (`URIs: URI …`) format.
fn debian_archive_uri(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| {
            let uris = if let Some(rest) = line.strip_prefix("URIs:") {
                rest
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`: options are bracketed.
                rest.split(']').next_back().unwrap_or(rest)
            } else {
                ""
            };
            uris.split_whitespace()
                .take(if line.starts_with("deb ") {
                    1
                } else {
                    usize::MAX
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
}

#[cfg(test)]
mod mirror_tests {
    use super::debian_archive_uri;

    #[test]
    fn finds_the_archive_in_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# URIs: http://old.example/debian\nURIs: http://mirror.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n";
        assert_eq!(
            debian_archive_uri(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = "deb http://mirror.example/debian-security bookworm-security main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            debian_archive_uri(one_line).as_deref(),
            Some("http://mirror.example/debian/")
        );
        assert_eq!(
            debian_archive_uri("deb https://other.example/apt stable main"),
            None
        );
    }
}
