//! Checking a 3.8–3.11 stack layout against the live process before the
//! kernel walks it. The offsets come from a per-version table; a build that
//! differs (a vendor patch, a wrong version) would give stacks of garbage,
//! so the structures they lead to must look right first:
//! - `_PyRuntime.interpreters.head`/`main` point to an interpreter whose
//!   thread list holds thread states that point back to it (`interp`);
//! - the GIL holder pointer the kernel reads (`gilstate.tstate_current`),
//!   when set, is one of those thread states;
//! - each thread's current frame, through the kernel's offsets, holds an
//!   object whose type is named `code`.
use std::collections::HashSet;

use pymem_common::NO_OFFSET;

use super::{PyVersion, layout::ProcessLayout, memory::ProcessMemory};

/// Offsets the check reads beyond the kernel's layout (x86-64, GIL builds;
/// read from the pyenv builds' DWARF with gdb).
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// `_PyRuntime.interpreters.head`; `main` follows it.
    runtime_interpreters_head: u64,
    /// `_PyRuntime.gilstate.tstate_current`, where the kernel starts.
    runtime_tstate_current: u64,
    /// `PyInterpreterState.tstate_head` (3.8–3.10), `.threads.head` (3.11).
    interp_threads_head: u64,
}

const TSTATE_NEXT: u64 = 8;
const TSTATE_INTERP: u64 = 16;
const OB_TYPE: u64 = 8;
const TP_NAME: u64 = 24;
/// Enough for any real process; a cycle or garbage stops here.
const MAX_THREADS: usize = 4096;

fn shape(version: PyVersion) -> Option<Shape> {
    match (version.major, version.minor) {
        (3, 8) => Some(Shape {
            runtime_interpreters_head: 32,
            runtime_tstate_current: 1368,
            interp_threads_head: 8,
        }),
        (3, 9) | (3, 10) => Some(Shape {
            runtime_interpreters_head: 32,
            runtime_tstate_current: 568,
            interp_threads_head: 8,
        }),
        (3, 11) => Some(Shape {
            runtime_interpreters_head: 40,
            runtime_tstate_current: 576,
            interp_threads_head: 16,
        }),
        _ => None,
    }
}

/// What the process's memory says about a layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed (what was seen, for the log).
    Verified(String),
    /// The interpreter is not far enough yet (not initialised, no Python
    /// frame anywhere): ask again later.
    NotYet(String),
    /// The layout does not fit this process: stacks must stay off.
    Wrong(String),
    /// No check exists for this version (the caller decides).
    Unchecked,
}

/// Checks `layout` against process `pid`'s memory.
pub fn check(pid: u32, version: PyVersion, layout: &ProcessLayout) -> Verdict {
    let Some(shape) = shape(version) else {
        return Verdict::Unchecked;
    };
    let memory = match ProcessMemory::open(pid) {
        Ok(memory) => memory,
        Err(e) => return Verdict::NotYet(format!("cannot open /proc/{pid}/mem: {e}")),
    };
    let runtime = layout.kernel.tstate_ptr_addr - shape.runtime_tstate_current;
    // The process runs while it is read: a frame popped between two reads
    // can look wrong once. A wrong layout looks wrong every time.
    let mut verdict = Verdict::Unchecked;
    for attempt in 0..WRONG_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        verdict = match check_runtime(&memory, runtime, &shape, layout) {
            Ok(verdict) | Err(verdict) => verdict,
        };
        if !matches!(verdict, Verdict::Wrong(_)) {
            break;
        }
    }
    verdict
}

/// Reads that must all look wrong before a layout is called wrong.
const WRONG_ATTEMPTS: usize = 3;

/// Reads that name what they read, for the verdict.
trait Named {
    /// A pointer-sized word, or a `Wrong` verdict naming what was read.
    fn word(&self, addr: u64, what: &str) -> Result<u64, Verdict>;
}

impl Named for ProcessMemory {
    fn word(&self, addr: u64, what: &str) -> Result<u64, Verdict> {
        self.u64(addr).map_err(|e| {
            Verdict::Wrong(format!("{what} at {addr:#x} is unreadable: {}", e.reason()))
        })
    }
}

/// Bytes of a type name (`tp_name`) read: room for `code` and its NUL.
const TYPE_NAME_MAX: usize = 32;

fn check_runtime(
    memory: &ProcessMemory,
    runtime: u64,
    shape: &Shape,
    layout: &ProcessLayout,
) -> Result<Verdict, Verdict> {
    let head = memory.word(
        runtime.wrapping_add(shape.runtime_interpreters_head),
        "interpreters.head",
    )?;
    let main = memory.word(
        runtime.wrapping_add(shape.runtime_interpreters_head + 8),
        "interpreters.main",
    )?;
    if head == 0 || main == 0 {
        return Err(Verdict::NotYet("the interpreter is not initialised".into()));
    }
    let threads = thread_states(memory, main, shape)?;
    if threads.is_empty() {
        return Err(Verdict::NotYet("the interpreter has no thread yet".into()));
    }
    let current = memory.word(layout.kernel.tstate_ptr_addr, "gilstate.tstate_current")?;
    if current != 0 && !threads.contains(&current) {
        return Err(Verdict::Wrong(format!(
            "gilstate.tstate_current ({current:#x}) is none of the interpreter's {} thread states",
            threads.len()
        )));
    }
    let frames = check_frames(memory, &threads, layout)?;
    if frames == 0 {
        return Err(Verdict::NotYet("no thread runs Python code yet".into()));
    }
    Ok(Verdict::Verified(format!(
        "thread states: {}, each pointing back to the main interpreter; GIL holder: {}; current frames holding code objects: {frames}",
        threads.len(),
        if current == 0 { "none" } else { "one of them" }
    )))
}

/// The main interpreter's thread states, each checked to point back to it.
/// Every pointer is the target's: sums wrap (and the read fails) rather
/// than overflow.
fn thread_states(
    memory: &ProcessMemory,
    interp: u64,
    shape: &Shape,
) -> Result<HashSet<u64>, Verdict> {
    let mut seen = HashSet::new();
    let mut tstate = memory.word(
        interp.wrapping_add(shape.interp_threads_head),
        "threads.head",
    )?;
    while tstate != 0 {
        if seen.len() >= MAX_THREADS || !seen.insert(tstate) {
            return Err(Verdict::Wrong(
                "the thread list does not end (wrong next offset)".into(),
            ));
        }
        let owner = memory.word(tstate.wrapping_add(TSTATE_INTERP), "PyThreadState.interp")?;
        if owner != interp {
            return Err(Verdict::Wrong(format!(
                "PyThreadState {tstate:#x} points to interpreter {owner:#x}, not {interp:#x}"
            )));
        }
        tstate = memory.word(tstate.wrapping_add(TSTATE_NEXT), "PyThreadState.next")?;
    }
    Ok(seen)
}

/// Follows each thread's current frame with the kernel's offsets; every
/// frame found must hold a code object. Returns how many were checked.
fn check_frames(
    memory: &ProcessMemory,
    threads: &HashSet<u64>,
    layout: &ProcessLayout,
) -> Result<usize, Verdict> {
    let kernel = &layout.kernel;
    let mut checked = 0;
    for &tstate in threads {
        let mut frame = memory.word(
            tstate.wrapping_add(kernel.tstate_frame),
            "the thread's frame",
        )?;
        if kernel.cframe_frame != NO_OFFSET && frame != 0 {
            frame = memory.word(
                frame.wrapping_add(kernel.cframe_frame),
                "cframe.current_frame",
            )?;
        }
        if frame == 0 {
            continue;
        }
        let code = memory.word(frame.wrapping_add(kernel.frame_code), "the frame's code")?;
        let type_name = memory
            .word(code.wrapping_add(OB_TYPE), "the code's type")
            .ok()
            .and_then(|tp| memory.word(tp.wrapping_add(TP_NAME), "tp_name").ok())
            .and_then(|name| memory.c_string(name, TYPE_NAME_MAX).ok());
        if type_name.as_deref() != Some("code") {
            return Err(Verdict::Wrong(format!(
                "the current frame of thread state {tstate:#x} holds a {type_name:?}, not a code object"
            )));
        }
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        sync::Arc,
    };

    use super::*;
    use crate::{
        cpython::{layout::layout_for, testing},
        discover::{Binary, Discoverer},
    };

    /// Thread lists a damaged process could have, laid out in this test
    /// process's memory: one that loops, one that ends at the top of the
    /// address space (where `tstate + offset` would overflow). Each is a
    /// `Wrong` verdict, never a panic.
    #[test]
    fn damaged_thread_lists_are_wrong_not_a_panic() {
        let memory = ProcessMemory::open(std::process::id()).unwrap();
        let shape = Shape {
            runtime_interpreters_head: 0,
            runtime_tstate_current: 0,
            interp_threads_head: 8,
        };
        let mut interp = [0u64; 2];
        let mut tstate = [0u64; 3];
        let interp_at = interp.as_ptr() as u64;
        let tstate_at = tstate.as_ptr() as u64;
        tstate[2] = interp_at; // interp
        for next in [tstate_at, u64::MAX - 7, u64::MAX - 15] {
            tstate[1] = next;
            interp[1] = tstate_at;
            let verdict = thread_states(&memory, interp_at, &shape);
            assert!(matches!(verdict, Err(Verdict::Wrong(_))), "next {next:#x}");
            interp[1] = next;
            let verdict = thread_states(&memory, interp_at, &shape);
            assert!(verdict.is_err(), "head {next:#x}");
        }
        std::hint::black_box((&interp, &tstate));
    }

    /// A Python process sitting in `time.sleep` (a thread in Python code),
    /// with the binary discovery finds for it.
    struct Sleeper {
        child: Child,
        binary: Binary,
    }

    impl Sleeper {
        fn start(python: &Path) -> Sleeper {
            let mut child = Command::new(python)
                .args([
                    "-c",
                    "import time; print('ready', flush=True); time.sleep(60)",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let binary = Discoverer::default()
                .inspect(child.id())
                .unwrap_or_else(|_| panic!("{} is not discovered", python.display()))
                .binary;
            Sleeper { child, binary }
        }

        /// The layout the agent would use if the binary were `minor`.
        fn check_as(&self, minor: u8) -> Verdict {
            let mut interpreter = (*self.binary.interpreter).clone();
            interpreter.version.minor = minor;
            let binary = Binary {
                interpreter: Arc::new(interpreter),
                ..self.binary.clone()
            };
            let layout = layout_for(self.child.id(), &binary, 0).unwrap();
            check(self.child.id(), binary.interpreter.version, &layout)
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The verdict on each 3.8–3.11 interpreter's memory under the layout of
    /// `as_minor(its own minor)`: (python, that minor, verdict).
    fn verdicts(as_minor: impl Fn(u8) -> u8) -> Vec<(PathBuf, u8, Verdict)> {
        let pythons = testing::interpreters_3_8_to_3_11_or_skip();
        pythons
            .into_iter()
            .map(|python| {
                let sleeper = Sleeper::start(&python);
                let minor = as_minor(sleeper.binary.interpreter.version.minor);
                let verdict = sleeper.check_as(minor);
                eprintln!("{} as 3.{minor}: {verdict:?}", python.display());
                (python, minor, verdict)
            })
            .collect()
    }

    /// Ground truth: each real interpreter's own memory fits its layout.
    #[test]
    fn every_3_8_to_3_11_interpreter_fits_its_layout() {
        for (python, _, verdict) in verdicts(|own| own) {
            assert!(
                matches!(verdict, Verdict::Verified(_)),
                "{}: {verdict:?}",
                python.display()
            );
        }
    }

    /// A version guessed one minor off gives the neighbour's offsets: the
    /// process's memory must refute them.
    #[test]
    fn a_neighbouring_versions_layout_is_refuted() {
        // 3.9 and 3.10 share a layout: compare across real differences.
        for (python, wrong, verdict) in verdicts(|own| if own == 11 { 10 } else { 11 }) {
            assert!(
                matches!(verdict, Verdict::Wrong(_)),
                "{} checked as 3.{wrong}: {verdict:?}",
                python.display()
            );
        }
    }
}
