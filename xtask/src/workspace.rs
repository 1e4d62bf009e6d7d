//! Where things are in the workspace, and the cargo invocations xtask makes.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::process;

/// The workspace root (xtask lives one level below it).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
}

pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

/// `cargo install`ed tools (bpf-linker) must be found by aya-build and by
/// our own checks even when the caller's PATH lacks ~/.cargo/bin (sudo, CI).
pub fn put_cargo_bin_on_path() {
    let cargo_bin = cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|dir| dir == cargo_bin) {
        return;
    }
    let joined = env::join_paths(std::iter::once(cargo_bin).chain(env::split_paths(&path)))
        .expect("PATH entries contain no separator");
    // SAFETY: called first thing in main, before any thread exists.
    unsafe { env::set_var("PATH", joined) };
}

/// The cargo that runs xtask (so the pinned toolchain is used), in the
/// workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Builds the release agent and returns the path of the `pymem` binary.
pub fn build_release_agent() -> Result<PathBuf> {
    process::run(cargo().args(["build", "--release", "-p", "pymem-agent"]))?;
    Ok(target_dir().join("release").join("pymem"))
}
