use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The nightly that builds the eBPF object; `cargo xtask setup` installs it
/// together with a bpf-linker linked against its LLVM.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR")?;
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        // Host-only builds (UI work, docs): an empty object makes the agent
        // fail at load time with a clear message instead of failing to build.
        std::fs::write(format!("{out_dir}/pymem"), b"")?;
        return Ok(());
    }
    let metadata = cargo_metadata_root()?;
    let root_dir = format!("{metadata}/pymem-ebpf");
    let package = Package {
        name: "pymem-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the eBPF programs; run `cargo xtask setup` first")
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("pymem-agent has no parent directory"))?;
    Ok(root.display().to_string())
}
