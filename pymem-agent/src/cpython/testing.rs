//! The real interpreters on this machine that the tests read (binaries) and
//! run (processes): pyenv's builds, Debian's, and those inside the test root
//! filesystems. Each finder prints a SKIP line when it finds none.
use std::path::{Path, PathBuf};

/// `dir`'s last component.
fn dir_name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every `~/.pyenv/versions/*` directory.
fn pyenv_versions() -> Vec<PathBuf> {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default());
    std::fs::read_dir(home.join(".pyenv/versions"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// `found` without its missing paths, with a SKIP line when none is left.
fn existing_or_skip<T>(mut found: Vec<T>, path: impl Fn(&T) -> &Path, skip: &str) -> Vec<T> {
    found.retain(|item| path(item).exists());
    if found.is_empty() {
        eprintln!("SKIP: {skip}");
    }
    found
}

/// 3.13+ interpreters (path, file name): pyenv's shared 3.13+ and the Debian
/// static stripped builds inside the test root filesystems.
pub fn debug_offset_interpreters_or_skip() -> Vec<(PathBuf, String)> {
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/rootfs");
    let mut found = Vec::new();
    for dir in pyenv_versions() {
        let name = dir_name(&dir);
        let Some(minor) = name.strip_prefix("3.").and_then(|r| r.split('.').next()) else {
            continue;
        };
        if minor.parse::<u8>().is_ok_and(|m| m >= 13) && !name.ends_with('t') {
            let lib = format!("libpython3.{minor}.so.1.0");
            found.push((dir.join("lib").join(&lib), lib));
        }
    }
    for (suite, python) in [("trixie", "python3.13"), ("sid", "python3.14")] {
        found.push((
            rootfs.join(suite).join("usr/bin").join(python),
            python.into(),
        ));
    }
    existing_or_skip(
        found,
        |(path, _)| path,
        "no Python 3.13+ here (pyenv or .cache/rootfs)",
    )
}

/// The pyenv 3.8–3.11 `python3`s (GIL builds) and Debian's 3.11.
pub fn interpreters_3_8_to_3_11_or_skip() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = pyenv_versions()
        .into_iter()
        .filter(|dir| {
            let name = dir_name(dir);
            ["3.8.", "3.9.", "3.10.", "3.11."]
                .iter()
                .any(|p| name.starts_with(p))
                && !name.ends_with('t')
        })
        .map(|dir| dir.join("bin/python3"))
        .collect();
    found.push(DEBIAN_PYTHON_3_11.into());
    existing_or_skip(found, |path| path, "no Python 3.8-3.11 here")
}

const DEBIAN_PYTHON_3_11: &str = "/usr/bin/python3.11";

/// Debian's stripped PGO build of 3.11, where it is installed.
pub fn debian_python_3_11() -> Option<&'static Path> {
    let skip = format!("{DEBIAN_PYTHON_3_11} is not installed");
    existing_or_skip(vec![Path::new(DEBIAN_PYTHON_3_11)], |path| path, &skip).pop()
}
