//! tracefs: where tracepoint ids and record formats live.
use std::path::Path;

use anyhow::{Result, anyhow};
use log::info;

const TRACEFS: &str = "/sys/kernel/tracing";
/// Where tracefs may be found: its own mount point, or inside debugfs.
const TRACEFS_ROOTS: [&str; 2] = [TRACEFS, "/sys/kernel/debug/tracing"];

/// Tracepoint ids live in tracefs; mount it when the host has not.
pub(super) fn ensure_tracefs() -> Result<()> {
    if TRACEFS_ROOTS
        .iter()
        .any(|root| Path::new(root).join("events").exists())
    {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS)?;
    let fstype = std::ffi::CString::new("tracefs")?;
    // SAFETY: valid NUL-terminated strings, no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Reads the offset of `child_pid` in sched_process_fork's record.
pub(super) fn fork_child_pid_offset() -> Option<u64> {
    let format = TRACEFS_ROOTS.iter().find_map(|root| {
        std::fs::read_to_string(format!("{root}/events/sched/sched_process_fork/format")).ok()
    })?;
    format.lines().find_map(|line| {
        if !line.contains(" child_pid;") {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}
