//! The Python interpreters pymem's tests and `cargo xtask` run, found in one
//! place: pyenv's builds (shared libpython, with symbols), Debian's own
//! (static, stripped, PGO + LTO) and those inside the Debian root
//! filesystems that `cargo xtask rootfs` builds under `.cache/rootfs/`.
use std::{
    env,
    path::{Path, PathBuf},
};

/// Debian's own build: statically linked, PGO/LTO, stripped — the case where
/// uprobes on the allocator miss inlined fast paths.
pub const DEBIAN_PYTHON_3_11: &str = "/usr/bin/python3.11";

/// [`DEBIAN_PYTHON_3_11`], if installed.
pub fn debian_python_3_11() -> Option<PathBuf> {
    let python = PathBuf::from(DEBIAN_PYTHON_3_11);
    python.is_file().then_some(python)
}

/// One CPython 3 installed under pyenv, e.g. `3.11.7` or `3.13.0t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pyenv {
    /// `<pyenv root>/versions/<version>`.
    pub dir: PathBuf,
    /// The `X` of `3.X`.
    pub minor: u8,
    /// The `N` of `3.X.N`.
    pub patch: u32,
    /// A free-threaded (PEP 703) build: its name ends in `t`.
    pub free_threaded: bool,
}

impl Pyenv {
    /// `3.X`.
    pub fn minor_version(&self) -> String {
        format!("3.{}", self.minor)
    }

    /// Its interpreter by its versioned name, `bin/python3.X` (`python3.Xt`
    /// when free-threaded): that is the executable itself, so the process
    /// is named for its version.
    pub fn python(&self) -> PathBuf {
        let suffix = if self.free_threaded { "t" } else { "" };
        self.dir
            .join("bin")
            .join(format!("python3.{}{suffix}", self.minor))
    }

    /// Its shared library, `lib/libpython3.X.so.1.0` (`3.Xt` when
    /// free-threaded, `3.Xm` before 3.8), if the build has one.
    pub fn libpython(&self) -> Option<PathBuf> {
        let suffix = if self.free_threaded { "t" } else { "" };
        [suffix, "m"]
            .iter()
            .map(|abi| {
                self.dir
                    .join("lib")
                    .join(format!("libpython3.{}{abi}.so.1.0", self.minor))
            })
            .find(|lib| lib.is_file())
    }
}

/// `$PYENV_ROOT`, else `~/.pyenv`.
pub fn pyenv_root() -> Option<PathBuf> {
    env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(env::var_os("HOME")?).join(".pyenv")))
}

/// `3.X.N` or `3.X.Nt`; other names (2.7, dev builds, virtualenvs) are not
/// test interpreters.
fn parse_version(name: &str) -> Option<(u8, u32, bool)> {
    let (name, free_threaded) = match name.strip_suffix('t') {
        Some(gil_free) => (gil_free, true),
        None => (name, false),
    };
    let mut parts = name.strip_prefix("3.")?.split('.');
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    parts
        .next()
        .is_none()
        .then_some((minor, patch, free_threaded))
}

/// Every CPython 3 under pyenv whose interpreter exists, oldest first.
pub fn pyenv_versions() -> Vec<Pyenv> {
    let Some(entries) = pyenv_root().and_then(|root| std::fs::read_dir(root.join("versions")).ok())
    else {
        return Vec::new();
    };
    let mut found: Vec<Pyenv> = entries
        .flatten()
        .filter_map(|entry| {
            let (minor, patch, free_threaded) = parse_version(entry.file_name().to_str()?)?;
            Some(Pyenv {
                dir: entry.path(),
                minor,
                patch,
                free_threaded,
            })
        })
        .filter(|pyenv| pyenv.python().is_file())
        .collect();
    found.sort_by_key(|p| (p.minor, p.patch, p.free_threaded));
    found
}

/// The newest pyenv `3.X.N` (with the GIL) of `minor` (`"3.X"`).
pub fn pyenv_build(minor: &str) -> Option<Pyenv> {
    pyenv_versions()
        .into_iter()
        .filter(|p| !p.free_threaded && p.minor_version() == minor)
        .max_by_key(|p| p.patch)
}

/// The interpreter of [`pyenv_build`]: `bin/python3.X`.
pub fn pyenv(minor: &str) -> Option<PathBuf> {
    pyenv_build(minor).map(|p| p.python())
}

/// The workspace root (this crate lives one level below it).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-interpreters is inside the workspace")
}

/// `.cache/rootfs/`: one Debian root filesystem per suite, from `cargo
/// xtask rootfs`.
pub fn rootfs_dir() -> PathBuf {
    workspace_root().join(".cache/rootfs")
}

/// `/usr/bin/<python>` inside the root filesystem of `suite`, if it is
/// there.
pub fn rootfs_python(suite: &str, python: &str) -> Option<PathBuf> {
    let path = rootfs_dir().join(suite).join("usr/bin").join(python);
    path.exists().then_some(path)
}

/// Is `name` a free-threaded interpreter's, `python3.Xt`?
fn is_free_threaded_name(name: &str) -> bool {
    name.strip_prefix("python3.")
        .and_then(|rest| rest.strip_suffix('t'))
        .is_some_and(|minor| minor.parse::<u8>().is_ok())
}

/// Free-threaded interpreters (`python3.Xt`) anywhere the tests look: the
/// system's bin directories, every pyenv build, every root filesystem.
pub fn free_threaded() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")];
    if let Some(Ok(versions)) = pyenv_root().map(|root| std::fs::read_dir(root.join("versions"))) {
        dirs.extend(versions.flatten().map(|e| e.path().join("bin")));
    }
    if let Ok(suites) = std::fs::read_dir(rootfs_dir()) {
        dirs.extend(suites.flatten().map(|e| e.path().join("usr/bin")));
    }
    let mut found: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| is_free_threaded_name(&n.to_string_lossy()))
        })
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyenv_version_names() {
        assert_eq!(parse_version("3.11.7"), Some((11, 7, false)));
        assert_eq!(parse_version("3.13.0t"), Some((13, 0, true)));
        assert_eq!(parse_version("3.14-dev"), None);
        assert_eq!(parse_version("3.12"), None);
        assert_eq!(parse_version("2.7.18"), None);
        assert_eq!(parse_version("3.11.7.1"), None);
        assert_eq!(parse_version("myenv"), None);
    }

    #[test]
    fn free_threaded_names() {
        assert!(is_free_threaded_name("python3.13t"));
        assert!(!is_free_threaded_name("python3.13"));
        assert!(!is_free_threaded_name("python3t"));
        assert!(!is_free_threaded_name("python3.13-config"));
    }

    #[test]
    fn newest_patch_of_a_minor() {
        for pyenv in pyenv_versions() {
            let newest = pyenv_build(&pyenv.minor_version()).unwrap();
            assert!(pyenv.free_threaded || newest.patch >= pyenv.patch);
            assert!(newest.python().is_file());
            // pyenv builds with --enable-shared.
            assert!(pyenv.libpython().is_some(), "{pyenv:?}");
        }
    }
}
