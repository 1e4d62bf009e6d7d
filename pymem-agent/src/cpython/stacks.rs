//! Python stacks: where each interpreter version keeps the current frame
//! (the layout the kernel side walks), and turning captured frames into
//! function/file/line by reading code objects from the process.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _};

use anyhow::{Context as _, Result, anyhow};
use pymem_common::{NO_OFFSET, PyFrame, PyLayout};
use serde::{Deserialize, Serialize};

use crate::discover::{
    Binary,
    elf::{Interpreter, PyVersion},
};

/// Per-version offsets (x86-64, default GIL builds), checked against the
/// interpreters' own debug info in the tests. For 3.13+ the binary's own
/// `_Py_DebugOffsets` override them where it has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VersionOffsets {
    /// Offset in `_PyRuntime` where the chain to the GIL holder's thread
    /// state starts (`gilstate.tstate_current` up to 3.11,
    /// `interpreters.head` since 3.12).
    runtime_tstate_chain: u64,
    /// 3.12+: `PyInterpreterState.ceval.gil`, `_gil_runtime_state.last_holder`.
    tstate_deref: [u64; 2],
    frame_owner: u64,
    /// Owner values from this one up mark frames that are not Python
    /// functions: `FRAME_OWNED_BY_CSTACK` (3.12, 3.13: 3), and 3.14's
    /// `FRAME_OWNED_BY_INTERPRETER` (3) and `FRAME_OWNED_BY_CSTACK` (4).
    first_shim_owner: u64,
    tstate_frame: u64,
    cframe_frame: u64,
    frame_code: u64,
    frame_back: u64,
    frame_instr: u64,
    code: CodeOffsets,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeOffsets {
    filename: u64,
    name: u64,
    first_line: u64,
    line_table: u64,
    /// `co_code_adaptive` (3.11+: instructions live inside the code object).
    code_adaptive: u64,
    /// Payload offset of a compact ASCII str.
    ascii_data: u64,
    format: LineFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineFormat {
    /// 3.8/3.9 co_lnotab, f_lasti in bytes
    Lnotab,
    /// 3.10 co_linetable, f_lasti in code units
    Linetable310,
    /// 3.11+ location table, instruction pointer into co_code_adaptive
    Locations,
}

/// The offsets for `interp`: the version's table, with what the binary's
/// own `_Py_DebugOffsets` states taking precedence (a vendor's patched
/// build keeps working; the tests check the table against it).
fn offsets_for(interp: &Interpreter) -> Option<VersionOffsets> {
    let mut offsets = offsets(interp.version)?;
    if let Some(debug) = &interp.stack_offsets {
        offsets.runtime_tstate_chain = debug.runtime_interpreters_head;
        offsets.tstate_deref = [debug.interp_ceval_gil, debug.gil_last_holder];
        offsets.tstate_frame = debug.tstate_current_frame;
        offsets.cframe_frame = NO_OFFSET;
        offsets.frame_code = debug.frame_executable;
        offsets.frame_back = debug.frame_previous;
        offsets.frame_instr = debug.frame_instr_ptr;
        offsets.frame_owner = debug.frame_owner;
        offsets.code.filename = debug.code_filename;
        offsets.code.name = debug.code_name;
        offsets.code.first_line = debug.code_firstlineno;
        offsets.code.line_table = debug.code_linetable;
        offsets.code.code_adaptive = debug.code_adaptive;
        offsets.code.ascii_data = debug.ascii_object_size;
    }
    Some(offsets)
}

fn offsets(version: PyVersion) -> Option<VersionOffsets> {
    let old_code = |format| CodeOffsets {
        filename: 104,
        name: 112,
        first_line: 40,
        line_table: 120,
        code_adaptive: 0,
        ascii_data: 48,
        format,
    };
    let new_code = |code_adaptive| CodeOffsets {
        filename: 112,
        name: 120,
        first_line: 68,
        line_table: 136,
        code_adaptive,
        ascii_data: 40,
        format: LineFormat::Locations,
    };
    let frame_object = |runtime_tstate_chain, format, frame_instr| VersionOffsets {
        runtime_tstate_chain,
        tstate_deref: [NO_OFFSET; 2],
        // f_code's low byte: never 0xff for an aligned pointer.
        frame_owner: 32,
        first_shim_owner: 0xff,
        tstate_frame: 24,
        cframe_frame: NO_OFFSET,
        frame_code: 32,
        frame_back: 24,
        frame_instr,
        code: old_code(format),
    };
    match (version.major, version.minor) {
        (3, 8) => Some(frame_object(1368, LineFormat::Lnotab, 104)),
        (3, 9) => Some(frame_object(568, LineFormat::Lnotab, 104)),
        (3, 10) => Some(frame_object(568, LineFormat::Linetable310, 96)),
        (3, 11) => Some(VersionOffsets {
            runtime_tstate_chain: 576,
            tstate_deref: [NO_OFFSET; 2],
            frame_owner: 32,
            first_shim_owner: 0xff,
            tstate_frame: 56,
            cframe_frame: 8,
            frame_code: 32,
            frame_back: 48,
            frame_instr: 56,
            code: CodeOffsets {
                filename: 112,
                name: 120,
                first_line: 72,
                line_table: 136,
                code_adaptive: 184,
                ascii_data: 48,
                format: LineFormat::Locations,
            },
        }),
        // 3.12+ keep the current thread state in TLS; the GIL's last holder
        // is the thread that allocates (allocation needs the GIL).
        (3, 12) => Some(VersionOffsets {
            runtime_tstate_chain: 40,
            tstate_deref: [384, 8],
            frame_owner: 70,
            first_shim_owner: 3,
            tstate_frame: 56,
            cframe_frame: 0,
            frame_code: 0,
            frame_back: 8,
            frame_instr: 56,
            code: new_code(192),
        }),
        (3, 13) => Some(VersionOffsets {
            runtime_tstate_chain: 632,
            tstate_deref: [16, 8],
            frame_owner: 70,
            first_shim_owner: 3,
            tstate_frame: 72,
            cframe_frame: NO_OFFSET,
            frame_code: 0,
            frame_back: 8,
            frame_instr: 56,
            code: new_code(200),
        }),
        // f_executable is a tagged `_PyStackRef` (low bit): masked by the
        // kernel walk and the symbolizer.
        (3, 14) => Some(VersionOffsets {
            runtime_tstate_chain: 808,
            tstate_deref: [16, 8],
            frame_owner: 74,
            first_shim_owner: 3,
            tstate_frame: 72,
            cframe_frame: NO_OFFSET,
            frame_code: 0,
            frame_back: 8,
            frame_instr: 56,
            code: new_code(208),
        }),
        _ => None,
    }
}

/// What the agent needs to symbolise one process's frames.
#[derive(Clone, Copy, Debug)]
pub struct ProcessLayout {
    pub kernel: PyLayout,
    pub code: CodeOffsets,
}

/// The stack layout of one process: version offsets plus where its
/// interpreter is loaded. `None` (with the reason) where stacks are not
/// supported for this build.
pub fn layout_for(pid: u32, binary: &Binary, sample_period: u64) -> Result<ProcessLayout> {
    let interp = &binary.interpreter;
    let offsets = offsets_for(interp)
        .ok_or_else(|| anyhow!("Python stacks are not supported for {} yet", interp.version))?;
    let runtime = interp
        .runtime_vaddr
        .ok_or_else(|| anyhow!("{} exports no _PyRuntime", binary.display_path))?;
    let bias = load_bias(pid, binary)?;
    Ok(ProcessLayout {
        kernel: PyLayout {
            tstate_ptr_addr: bias + runtime + offsets.runtime_tstate_chain,
            tstate_deref: offsets.tstate_deref,
            tstate_frame: offsets.tstate_frame,
            cframe_frame: offsets.cframe_frame,
            frame_code: offsets.frame_code,
            frame_back: offsets.frame_back,
            frame_instr: offsets.frame_instr,
            frame_owner: offsets.frame_owner,
            first_shim_owner: offsets.first_shim_owner,
            sample_period,
        },
        code: offsets.code,
    })
}

/// Where the binary's first segment is mapped, minus its link address.
fn load_bias(pid: u32, binary: &Binary) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading maps of {pid}"))?;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 {
            continue;
        }
        let inode: u64 = fields[4].parse().unwrap_or(0);
        let offset = u64::from_str_radix(fields[2], 16).unwrap_or(1);
        if inode == binary.id.ino && offset == 0 {
            let start = u64::from_str_radix(fields[0].split('-').next().unwrap_or(""), 16)?;
            let link = binary.interpreter.first_load_vaddr & !0xfff;
            return Ok(start.wrapping_sub(link));
        }
    }
    Err(anyhow!("{} is not mapped in {pid}", binary.display_path))
}

/// One symbolised frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
}

#[cfg(test)]
impl Frame {
    /// A frame of `app.py`, for tests.
    pub fn in_app(function: &str, line: i64) -> Self {
        Self {
            function: function.into(),
            file: "app.py".into(),
            line,
        }
    }
}

struct CodeInfo {
    function: String,
    file: String,
    first_line: i64,
    line_table: Vec<u8>,
}

/// Reads code objects out of one process, cached by address.
pub struct Symbolizer {
    mem: File,
    layout: CodeOffsets,
    code: HashMap<u64, Option<CodeInfo>>,
}

impl Symbolizer {
    pub fn new(pid: u32, layout: CodeOffsets) -> Result<Self> {
        let mem = File::open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("opening /proc/{pid}/mem"))?;
        Ok(Self {
            mem,
            layout,
            code: HashMap::new(),
        })
    }

    /// Symbolises a captured stack, leaving out C-stack shim frames
    /// (recorded with code 0).
    pub fn stack(&mut self, frames: &[PyFrame]) -> Vec<Frame> {
        frames
            .iter()
            .filter(|f| f.code != 0)
            .map(|f| self.frame(f))
            .collect()
    }

    pub fn frame(&mut self, frame: &PyFrame) -> Frame {
        // 3.14 tags stack references in the low bits; objects are aligned.
        let frame = &PyFrame {
            code: frame.code & !7,
            instr: frame.instr,
        };
        let layout = self.layout;
        let mem = &self.mem;
        let info = self
            .code
            .entry(frame.code)
            .or_insert_with(|| read_code(mem, &layout, frame.code).ok());
        let Some(info) = info else {
            return Frame {
                function: "<unknown>".into(),
                file: "<unknown>".into(),
                line: 0,
            };
        };
        let line = match layout.format {
            LineFormat::Lnotab => super::linetable::line_from_lnotab(
                &info.line_table,
                info.first_line,
                frame.instr & 0xffff_ffff,
            ),
            LineFormat::Linetable310 => super::linetable::line_from_linetable_310(
                &info.line_table,
                info.first_line,
                (frame.instr & 0xffff_ffff) * 2,
            ),
            LineFormat::Locations => {
                let start = frame.code + layout.code_adaptive;
                let index = frame.instr.saturating_sub(start) / 2;
                super::linetable::line_from_locations(&info.line_table, info.first_line, index)
            }
        };
        Frame {
            function: info.function.clone(),
            file: info.file.clone(),
            line: line.unwrap_or(info.first_line),
        }
    }
}

fn read_bytes(mem: &File, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr)
        .with_context(|| format!("reading {len} bytes at {addr:#x}"))?;
    Ok(buf)
}

fn read_u64(mem: &File, addr: u64) -> Result<u64> {
    Ok(u64::from_le_bytes(
        read_bytes(mem, addr, 8)?.try_into().expect("8 bytes"),
    ))
}

fn read_code(mem: &File, layout: &CodeOffsets, code: u64) -> Result<CodeInfo> {
    let filename = read_u64(mem, code + layout.filename)?;
    let name = read_u64(mem, code + layout.name)?;
    let first_line = i64::from(i32::from_le_bytes(
        read_bytes(mem, code + layout.first_line, 4)?
            .try_into()
            .expect("4 bytes"),
    ));
    let table = read_u64(mem, code + layout.line_table)?;
    Ok(CodeInfo {
        function: read_str(mem, layout, name)?,
        file: read_str(mem, layout, filename)?,
        first_line,
        line_table: read_bytes_object(mem, table)?,
    })
}

/// A compact `str`: length at +16, ASCII payload after the header.
fn read_str(mem: &File, layout: &CodeOffsets, addr: u64) -> Result<String> {
    let length = read_u64(mem, addr + 16)?;
    if length > 4096 {
        return Err(anyhow!("implausible str length {length}"));
    }
    let state = read_bytes(mem, addr + 32, 1)?[0];
    let ascii = state & 0x40 != 0;
    if !ascii {
        return Ok("<non-ascii>".into());
    }
    let bytes = read_bytes(mem, addr + layout.ascii_data, length as usize)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A `bytes` object: size at +16, payload at +32.
fn read_bytes_object(mem: &File, addr: u64) -> Result<Vec<u8>> {
    let size = read_u64(mem, addr + 16)?;
    if size > 1 << 20 {
        return Err(anyhow!("implausible bytes size {size}"));
    }
    read_bytes(mem, addr + 32, size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::elf;

    /// The hard-coded 3.13/3.14 offsets are exactly what each binary's own
    /// `_Py_DebugOffsets` states.
    #[test]
    fn table_matches_each_binarys_debug_offsets() {
        let interpreters = elf::tests::debug_offset_interpreters();
        if interpreters.is_empty() {
            eprintln!("SKIP: no Python 3.13+ here (pyenv or .cache/rootfs)");
            return;
        }
        for (path, name) in interpreters {
            let interp = elf::analyze(&path, &name).unwrap();
            let debug = interp
                .stack_offsets
                .unwrap_or_else(|| panic!("{}: no stack offsets read", path.display()));
            let table = offsets(interp.version)
                .unwrap_or_else(|| panic!("{}: no table for {}", path.display(), interp.version));
            let from_binary = offsets_for(&interp).unwrap();
            assert_eq!(table, from_binary, "{}: {debug:#?}", path.display());
            eprintln!(
                "{} ({}): table = _Py_DebugOffsets",
                path.display(),
                interp.version
            );
        }
    }

    /// 3.8–3.12 carry no `_Py_DebugOffsets`: the table alone decides.
    #[test]
    fn versions_before_313_use_the_table() {
        for minor in 8..=12 {
            let version = PyVersion {
                major: 3,
                minor,
                micro: 0,
            };
            assert!(offsets(version).is_some(), "3.{minor}");
        }
        let future = PyVersion {
            major: 3,
            minor: 15,
            micro: 0,
        };
        assert!(offsets(future).is_none());
    }
}
