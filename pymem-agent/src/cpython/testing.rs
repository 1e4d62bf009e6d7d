//! The real interpreters the unit tests read (binaries) and run (processes),
//! from the `test-interpreters` crate that also serves the integration tests
//! and xtask. Each finder prints a SKIP line when it finds none.
use std::path::{Path, PathBuf};

/// `found`, with a SKIP line when it is empty.
fn or_skip<T>(found: Vec<T>, skip: &str) -> Vec<T> {
    if found.is_empty() {
        eprintln!("SKIP: {skip}");
    }
    found
}

/// 3.13+ interpreters (path, file name): pyenv's shared 3.13+ and the Debian
/// static stripped builds inside the test root filesystems.
pub fn debug_offset_interpreters_or_skip() -> Vec<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = test_interpreters::pyenv_versions()
        .into_iter()
        .filter(|build| build.minor >= 13 && !build.free_threaded)
        .filter_map(|build| build.libpython())
        .map(|lib| {
            let name = lib.file_name().unwrap().to_string_lossy().into_owned();
            (lib, name)
        })
        .collect();
    for (suite, python) in [("trixie", "python3.13"), ("sid", "python3.14")] {
        if let Some(path) = test_interpreters::rootfs_python(suite, python) {
            found.push((path, python.into()));
        }
    }
    or_skip(found, "no Python 3.13+ here (pyenv or .cache/rootfs)")
}

/// The pyenv 3.8–3.11 interpreters (GIL builds) and Debian's 3.11.
pub fn interpreters_3_8_to_3_11_or_skip() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = test_interpreters::pyenv_versions()
        .into_iter()
        .filter(|build| (8..=11).contains(&build.minor) && !build.free_threaded)
        .map(|build| build.python())
        .filter(|python| python.is_file())
        .collect();
    found.extend(test_interpreters::debian_python_3_11());
    or_skip(found, "no Python 3.8-3.11 here")
}

/// Debian's stripped PGO build of 3.11, where it is installed.
pub fn debian_python_3_11() -> Option<PathBuf> {
    let found = test_interpreters::debian_python_3_11();
    if found.is_none() {
        eprintln!(
            "SKIP: {} is not installed",
            test_interpreters::DEBIAN_PYTHON_3_11
        );
    }
    found
}

/// Every pyenv CPython 3 with a shared libpython: (its `libpython3.X*.so`,
/// its interpreter).
pub fn pyenv_libpythons_or_skip() -> Vec<(PathBuf, PathBuf)> {
    let found = test_interpreters::pyenv_versions()
        .into_iter()
        .filter_map(|build| Some((build.libpython()?, build.python())))
        .collect();
    or_skip(found, "no pyenv interpreters with a shared libpython")
}

/// `path`'s file name, for `analyze`'s name hint.
pub fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// A small xorshift generator: garbage without a dependency, the same for
/// the same seed.
pub fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
