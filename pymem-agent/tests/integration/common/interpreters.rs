//! The interpreters the tests can run and how to launch memwork.py under
//! each: on the host, inside a Debian root filesystem (chroot), and inside
//! its own PID namespace.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use test_interpreters::DEBIAN_PYTHON_3_11;

use super::{WORKLOAD, Workload, debian_python_3_11, pyenv};

/// Where and how a Python process runs.
#[derive(Clone, Debug)]
pub enum Launch {
    /// A binary on the host.
    Host(PathBuf),
    /// `/usr/bin/<python>` inside a root filesystem, under `chroot`: the
    /// binary exists only inside that root.
    Chroot { root: PathBuf, python: String },
    /// The same inside its own PID (and mount) namespace, as in a container.
    ChrootPidNamespace { root: PathBuf, python: String },
}

impl Launch {
    /// `python -u SCRIPT` under this launch (SCRIPT a host path); for
    /// roots, the script is copied into the root's /tmp first and runs
    /// with a clean environment.
    pub fn python_command(&self, script: &str) -> Command {
        match self {
            Launch::Host(python) => {
                let mut command = Command::new(python);
                command.arg("-u").arg(script);
                command
            }
            Launch::Chroot { root, python } => {
                let inside = install_script(root, script);
                let mut chroot = Command::new("chroot");
                chroot.arg(root).arg(format!("/usr/bin/{python}"));
                clean_env(&mut chroot).arg("-u").arg(inside);
                chroot
            }
            Launch::ChrootPidNamespace { root, python } => {
                let inside = install_script(root, script);
                // --mount-proc mounts a new /proc inside the root, in a new
                // mount namespace, so the host's mounts are untouched.
                let mut unshare = Command::new("unshare");
                unshare
                    .args(["--pid", "--fork", "--kill-child"])
                    .arg(format!("--mount-proc={}", root.join("proc").display()))
                    .arg("chroot")
                    .arg(root)
                    .arg(format!("/usr/bin/{python}"));
                clean_env(&mut unshare).arg("-u").arg(inside);
                unshare
            }
        }
    }

    /// Runs memwork.py under this launch.
    pub fn spawn_workload(&self) -> Workload {
        Workload::spawn_with(&mut self.python_command(WORKLOAD))
    }

    /// How the process runs, for the support table.
    pub fn describe(&self) -> String {
        match self {
            Launch::Host(_) => "host".into(),
            Launch::Chroot { root, .. } => format!("chroot ({})", suite_of(root)),
            Launch::ChrootPidNamespace { root, .. } => {
                format!("chroot ({}) + own PID namespace", suite_of(root))
            }
        }
    }
}

fn suite_of(root: &Path) -> String {
    root.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A root filesystem has none of the host's environment (pyenv shims,
/// PYTHONPATH): start from a plain one.
fn clean_env(command: &mut Command) -> &mut Command {
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("LANG", "C.UTF-8")
}

/// Copies `script` into `<root>/tmp` as `pymem-<name>` and returns its path
/// inside the root.
fn install_script(root: &Path, script: &str) -> String {
    let name = Path::new(script)
        .file_name()
        .expect("a script file")
        .to_string_lossy();
    let inside = format!("/tmp/pymem-{name}");
    std::fs::copy(script, root.join(inside.trim_start_matches('/')))
        .unwrap_or_else(|e| panic!("copying {script} into {}: {e}", root.display()));
    inside
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is inside the workspace")
        .to_path_buf()
}

/// The Debian root filesystem of `suite` under .cache/rootfs, from `cargo
/// xtask rootfs` (idempotent: it reuses a complete, up-to-date one in a
/// second, and builds or rebuilds it otherwise). Err with the reason when
/// it cannot be had here.
pub fn debian_rootfs(suite: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Its own target directory: the test run's cargo may hold the build lock.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("xtask-rootfs");
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["xtask", "rootfs", suite])
        .env("CARGO_TARGET_DIR", target)
        .output()
        .map_err(|e| format!("cannot run cargo xtask rootfs {suite}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let root = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if !output.status.success() || !root.is_dir() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "`cargo xtask rootfs {suite}` failed ({}): {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(root)
}

/// One interpreter build of the test matrix.
#[derive(Clone, Debug)]
pub struct Interpreter {
    /// Stable name of the case (file name of its result).
    pub id: String,
    /// `3.X` as expected from the binary.
    pub minor: String,
    /// What kind of build it is, for the support table.
    pub build: String,
    /// How to run it, or why it cannot be run here.
    pub launch: Result<Launch, String>,
}

impl Interpreter {
    /// A pyenv build: shared libpython, with symbols, no PGO.
    pub fn pyenv(minor: &str) -> Self {
        Self {
            id: format!("pyenv-{minor}"),
            minor: minor.into(),
            build: "pyenv: shared libpython, symbols".into(),
            launch: pyenv(minor)
                .map(Launch::Host)
                .ok_or_else(|| format!("pyenv {minor} is not installed here")),
        }
    }

    /// Debian 12's own interpreter: static, stripped, PGO + LTO.
    pub fn debian_host_311() -> Self {
        Self {
            id: "debian12-3.11".into(),
            minor: "3.11".into(),
            build: "Debian 12: static, stripped, PGO+LTO".into(),
            launch: debian_python_3_11()
                .map(Launch::Host)
                .ok_or_else(|| format!("{DEBIAN_PYTHON_3_11} is not installed")),
        }
    }

    /// A Debian suite's interpreter inside its root filesystem (static,
    /// stripped, PGO + LTO like every Debian build).
    pub fn debian_rootfs(suite: &str, minor: &str, pid_namespace: bool) -> Self {
        let python = format!("python{minor}");
        let launch = debian_rootfs(suite).and_then(|root| {
            if !root.join("usr/bin").join(&python).exists() {
                return Err(format!("{suite} rootfs has no /usr/bin/{python}"));
            }
            Ok(if pid_namespace {
                Launch::ChrootPidNamespace { root, python }
            } else {
                Launch::Chroot { root, python }
            })
        });
        Self {
            id: format!("debian-{suite}-{minor}"),
            minor: minor.into(),
            build: format!("Debian {suite}: static, stripped, PGO+LTO"),
            launch,
        }
    }
}
