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

const MIRROR: &str = "http://deb.debian.org/debian";
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
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    process::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", suite.packages()))
            .arg(suite.name)
            .arg(dir)
            .arg(MIRROR)
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
