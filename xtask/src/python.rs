//! The Python interpreters that setup and the benchmarks use.
use std::{env, path::PathBuf};

use crate::workspace;

/// Debian's own build: statically linked, PGO/LTO, stripped — the case where
/// uprobes on the allocator miss inlined fast paths.
pub const DEBIAN_PYTHON_3_11: &str = "/usr/bin/python3.11";

fn pyenv_root() -> PathBuf {
    env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace::home().join(".pyenv"))
}

/// The newest pyenv `<minor>.N` interpreter (shared libpython builds).
pub fn pyenv_python(minor: &str) -> Option<PathBuf> {
    let prefix = format!("{minor}.");
    let versions = std::fs::read_dir(pyenv_root().join("versions")).ok()?;
    versions
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let patch: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            let python = entry.path().join("bin").join("python");
            python.is_file().then_some((patch, python))
        })
        .max_by_key(|(patch, _)| *patch)
        .map(|(_, python)| python)
}
