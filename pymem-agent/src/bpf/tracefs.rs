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

/// The format of one tracepoint's record, from the first tracefs that has it.
fn event_format(category: &str, event: &str) -> Option<String> {
    TRACEFS_ROOTS.iter().find_map(|root| {
        std::fs::read_to_string(format!("{root}/events/{category}/{event}/format")).ok()
    })
}

/// Reads the offset of `child_pid` in sched_process_fork's record.
pub(super) fn fork_child_pid_offset() -> Option<u64> {
    field_offset(&event_format("sched", "sched_process_fork")?, "child_pid")
}

/// Where `oom/mark_victim` keeps the victim's pid and its anonymous RSS
/// (`None`: not in this kernel's record, or no such tracepoint).
pub(super) fn oom_victim_offsets() -> (Option<u64>, Option<u64>) {
    let Some(format) = event_format("oom", "mark_victim") else {
        return (None, None);
    };
    (
        field_offset(&format, "pid"),
        field_offset(&format, "anon_rss"),
    )
}

/// The offset of field `name` in a tracepoint format
/// (`field:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;`). The
/// name is the declaration's last word, so `pid` is not `common_pid`.
fn field_offset(format: &str, name: &str) -> Option<u64> {
    format.lines().find_map(|line| {
        let declaration = line.trim().strip_prefix("field:")?.split(';').next()?;
        let declared = declaration.split_whitespace().last()?;
        // Arrays: `char comm[16]`.
        let declared = declared.split('[').next()?;
        if declared != name {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.18's record.
    const MARK_VICTIM: &str = "name: mark_victim
ID: 609
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"pid=%d comm=%s\", REC->pid, __get_str(comm)
";

    #[test]
    fn fields_are_found_by_their_own_name() {
        assert_eq!(field_offset(MARK_VICTIM, "pid"), Some(8));
        assert_eq!(field_offset(MARK_VICTIM, "common_pid"), Some(4));
        assert_eq!(field_offset(MARK_VICTIM, "anon_rss"), Some(24));
        assert_eq!(field_offset(MARK_VICTIM, "comm"), Some(12));
        assert_eq!(field_offset(MARK_VICTIM, "file_rss"), None);
        let fork = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                    \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(fork, "child_pid"), Some(44));
        assert_eq!(field_offset(fork, "parent_comm"), Some(8));
    }
}
