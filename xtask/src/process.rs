//! Running external programs, with errors that name the command that failed,
//! and children that are cleaned up even when xtask fails half-way.
use std::{
    env,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// `program` run as root: directly when we are root, else through
/// non-interactive sudo (setup must never stop at a password prompt).
pub fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.args(["-n", program]);
        cmd
    }
}

/// `program args...`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited output; fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    ensure!(status.success(), "`{}` failed ({status})", describe(cmd));
    Ok(())
}

/// Runs `cmd` silently: for checks where only success matters.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs `cmd` with its output captured: shown only if it fails (apt and
/// dpkg are chatty even with -qq).
pub fn run_quietly(cmd: &mut Command) -> Result<()> {
    captured(cmd).map(drop)
}

/// The standard output of `cmd`, which must succeed.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let output = captured(cmd)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Output of `cmd`; on failure an error with the end of what it printed.
fn captured(cmd: &mut Command) -> Result<Output> {
    const SHOWN_LINES: usize = 20;
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !output.status.success() {
        let printed =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = printed.lines().collect();
        let tail = lines[lines.len().saturating_sub(SHOWN_LINES)..].join("\n");
        bail!("`{}` failed ({}):\n{tail}", describe(cmd), output.status);
    }
    Ok(output)
}

/// A child that is terminated (SIGTERM, then SIGKILL after a grace period)
/// when dropped, so no benchmark leaves an agent or Python process behind.
pub struct Supervised {
    child: Option<Child>,
    name: String,
    grace: Duration,
}

impl Supervised {
    pub fn spawn(cmd: &mut Command, name: impl Into<String>, grace: Duration) -> Result<Self> {
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} (`{}`)", describe(cmd)))?;
        Ok(Self {
            child: Some(child),
            name,
            grace,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("child is present until stopped")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is present until stopped")
    }

    /// Fails if the child has already exited (e.g. the agent could not load).
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child_mut().try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited unexpectedly ({status})", self.name),
        }
    }

    /// Waits for the child to exit on its own (its stdin closed, say).
    pub fn wait(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().expect("child is present until stopped");
        Ok(child.wait()?)
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let child = self.child.take().expect("child is present until stopped");
        terminate(child, self.grace).with_context(|| format!("stopping {}", self.name))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && let Err(e) = terminate(child, self.grace)
        {
            eprintln!("warning: stopping {}: {e:#}", self.name);
        }
    }
}

fn terminate(mut child: Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: plain syscall; `child` has not been reaped, so the pid is ours.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    Ok(child.wait()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_failures_show_what_was_printed() {
        let error = run_quietly(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sh -c") && error.contains("out\nerr"),
            "{error}"
        );
        assert!(run_quietly(&mut Command::new("true")).is_ok());
    }
}
