//! `cargo xtask setup`: installs what the build and the tests need. Every
//! item is checked first, so a second run only checks (and is quick), and
//! prints one line per item.
use std::{
    fmt, fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    process::{self, privileged, stdout_of, succeeds},
    workspace,
};

/// Builds the eBPF object; must match `EBPF_TOOLCHAIN` in pymem-agent/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's feature for the LLVM major version of `EBPF_TOOLCHAIN`.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Debian packages: promtool (metrics tests), tmux (`pymem top` tests),
/// debootstrap (`rootfs`), binutils/procps/iproute2 (tests inspect binaries,
/// processes and network namespaces), numpy for Debian's python3.11,
/// chromium (the `pymem run --report` tests open the report headless),
/// bpftool (the restart tests count the agent's BPF links and programs),
/// openssl and curl (the protected API's tests make certificates and speak
/// TLS with basic auth).
const APT_PACKAGES: &[&str] = &[
    "prometheus",
    "tmux",
    "debootstrap",
    "binutils",
    "procps",
    "iproute2",
    "python3-numpy",
    "chromium",
    "bpftool",
    "openssl",
    "curl",
];

/// Python packages for the pyenv 3.11 interpreter: (pip name, module name).
/// numpy exercises extension-buffer tracking; kubernetes-validate checks the
/// deploy manifests.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("numpy", "numpy"),
    ("kubernetes-validate", "kubernetes_validate"),
];

/// numpy for the other pyenv interpreters too: the interpreter matrix
/// (pymem-agent/tests/integration/matrix.rs) checks numpy buffers on every version.
const NUMPY_PYENV_MINORS: &[&str] = &["3.8", "3.9", "3.10", "3.12", "3.13"];

enum Outcome {
    Present,
    Installed,
    Mounted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Present => "present",
            Outcome::Installed => "installed",
            Outcome::Mounted => "mounted",
        })
    }
}

pub fn run() -> Result<()> {
    println!("setup:");
    required(
        &format!("rust {EBPF_TOOLCHAIN} + rust-src"),
        ensure_ebpf_toolchain,
    )?;
    let sysroot = ebpf_sysroot()?;
    let llvm_prefix = workspace::home().join(".local/share/pymem/llvm");
    required(
        &format!("LLVM symlinks in {}", llvm_prefix.display()),
        || ensure_llvm_symlinks(&sysroot, &llvm_prefix),
    )?;
    required(&format!("bpf-linker {BPF_LINKER_VERSION}"), || {
        ensure_bpf_linker(&llvm_prefix)
    })?;
    optional("tracefs at /sys/kernel/tracing", ensure_tracefs);
    ensure_apt_packages(APT_PACKAGES);
    ensure_pip_packages();
    ensure_numpy_for_every_pyenv();
    Ok(())
}

/// The pinned nightly alone (the fuzz targets need it, not bpf-linker).
pub fn ensure_nightly() -> Result<()> {
    required(
        &format!("rust {EBPF_TOOLCHAIN} + rust-src"),
        ensure_ebpf_toolchain,
    )
}

/// Without these nothing builds: stop with the reason.
fn required(item: &str, ensure: impl FnOnce() -> Result<Outcome>) -> Result<()> {
    let outcome = ensure().with_context(|| format!("setup: cannot provide {item}"))?;
    println!("  {item}: {outcome}");
    Ok(())
}

/// Only some tests or tools need these: warn and go on.
fn optional(item: &str, ensure: impl FnOnce() -> Result<Outcome>) {
    match ensure() {
        Ok(outcome) => println!("  {item}: {outcome}"),
        Err(e) => println!("  {item}: WARNING: not available ({e:#}); continuing"),
    }
}

fn ensure_ebpf_toolchain() -> Result<Outcome> {
    let has_rust_src = |sysroot: PathBuf| sysroot.join("lib/rustlib/src/rust/library").is_dir();
    if ebpf_sysroot().is_ok_and(has_rust_src) {
        return Ok(Outcome::Present);
    }
    ensure!(
        process::on_path("rustup"),
        "rustup is not on PATH; install Rust through rustup first"
    );
    process::run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--component",
        "rust-src",
        "--profile",
        "minimal",
    ]))?;
    Ok(Outcome::Installed)
}

fn ebpf_sysroot() -> Result<PathBuf> {
    let sysroot = stdout_of(
        Command::new("rustup")
            .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
            // A check must not start a download.
            .env("RUSTUP_AUTO_INSTALL", "0"),
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// bpf-linker must link against the very LLVM of the nightly that emits the
/// bitcode. That library has a versioned name only (`libLLVM.so.22.1-rust-…`),
/// so bpf-linker's build gets a prefix whose lib/ has both the plain and the
/// versioned name; the built binary keeps that lib/ as its run path.
fn ensure_llvm_symlinks(sysroot: &Path, prefix: &Path) -> Result<Outcome> {
    let library = versioned_libllvm(sysroot)?;
    let lib_dir = prefix.join("lib");
    let versioned_name = library.file_name().expect("library path has a file name");
    let links = [lib_dir.join("libLLVM.so"), lib_dir.join(versioned_name)];
    if links
        .iter()
        .all(|link| fs::read_link(link).is_ok_and(|target| target == library))
    {
        return Ok(Outcome::Present);
    }
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    for link in &links {
        remove_if_present(link)?;
        symlink(&library, link).with_context(|| format!("creating {}", link.display()))?;
    }
    Ok(Outcome::Installed)
}

/// `<sysroot>/lib/libLLVM.so.<version>` of the eBPF toolchain.
fn versioned_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|entry| entry.ok())
        .find(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("libLLVM.so.")
        })
        .map(|entry| entry.path())
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn ensure_bpf_linker(llvm_prefix: &Path) -> Result<Outcome> {
    if installed_bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(Outcome::Present);
    }
    println!("  bpf-linker {BPF_LINKER_VERSION}: building (takes a few minutes)");
    process::run(
        workspace::cargo()
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", llvm_prefix),
    )?;
    let version = installed_bpf_linker_version();
    ensure!(
        version.as_deref() == Some(BPF_LINKER_VERSION),
        "after `cargo install`, `bpf-linker --version` reports {version:?}; is ~/.cargo/bin on PATH?"
    );
    Ok(Outcome::Installed)
}

/// The version `bpf-linker --version` prints, if it runs at all (it fails to
/// start when its LLVM library is missing).
fn installed_bpf_linker_version() -> Option<String> {
    let output = stdout_of(Command::new("bpf-linker").arg("--version")).ok()?;
    // "bpf-linker 0.13.0"
    output.split_whitespace().nth(1).map(str::to_owned)
}

fn ensure_tracefs() -> Result<Outcome> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(Outcome::Present);
    }
    process::run(privileged("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    Ok(Outcome::Mounted)
}

/// Installs the missing Debian packages, one line each; failures are warnings.
pub fn ensure_apt_packages(packages: &[&str]) {
    let mut lists_updated = false;
    for package in packages {
        optional(&format!("apt {package}"), || {
            ensure_apt_package(package, &mut lists_updated)
        });
    }
}

fn ensure_apt_package(package: &str, lists_updated: &mut bool) -> Result<Outcome> {
    if apt_package_installed(package) {
        return Ok(Outcome::Present);
    }
    if !*lists_updated {
        // Once per run, even if it fails: stale lists may still do.
        *lists_updated = true;
        process::run_quietly(privileged("apt-get").args(["update", "-qq"]))?;
    }
    // Through `env`, because sudo would drop DEBIAN_FRONTEND.
    process::run_quietly(privileged("env").args([
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        package,
    ]))?;
    Ok(Outcome::Installed)
}

/// `dpkg -s` also succeeds for removed packages whose configuration is left,
/// so ask for the exact state.
fn apt_package_installed(package: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_ok_and(|status| status == "installed")
}

fn ensure_pip_packages() {
    let Some(python) = test_interpreters::pyenv("3.11") else {
        println!("  pyenv 3.11: WARNING: not found under ~/.pyenv/versions; skipping pip packages");
        return;
    };
    for (package, module) in PIP_PACKAGES {
        optional(&format!("pip {package} for {}", python.display()), || {
            ensure_pip_package(&python, package, module)
        });
    }
}

fn ensure_numpy_for_every_pyenv() {
    for minor in NUMPY_PYENV_MINORS {
        // Absent interpreters are the matrix test's to report (SKIP).
        if let Some(python) = test_interpreters::pyenv(minor) {
            optional(&format!("pip numpy for {}", python.display()), || {
                ensure_pip_package(&python, "numpy", "numpy")
            });
        }
    }
}

fn ensure_pip_package(python: &Path, package: &str, module: &str) -> Result<Outcome> {
    if importable(python, module) {
        return Ok(Outcome::Present);
    }
    pip_install(python, &[package])?;
    ensure!(
        importable(python, module),
        "installed, but `import {module}` still fails"
    );
    Ok(Outcome::Installed)
}

/// Whether `python` can import `module`.
pub fn importable(python: &Path, module: &str) -> bool {
    succeeds(Command::new(python).args(["-c", &format!("import {module}")]))
}

/// `pip install` of `packages` into `python`'s environment, from the index
/// the machine's own pip configuration names.
pub fn pip_install(python: &Path, packages: &[&str]) -> Result<()> {
    process::run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )
}
