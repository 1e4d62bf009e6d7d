//! Turning captured frames into function, file and line by reading code
//! objects out of the process.
use std::collections::HashMap;

use anyhow::{Context as _, Result};
use pymem_common::PyFrame;
use serde::{Deserialize, Serialize};

use super::{
    linetable,
    memory::ProcessMemory,
    offsets::{CodeOffsets, LineFormat},
};

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
    mem: ProcessMemory,
    layout: CodeOffsets,
    code: HashMap<u64, Option<CodeInfo>>,
}

impl Symbolizer {
    pub fn new(pid: u32, layout: CodeOffsets) -> Result<Self> {
        let mem = ProcessMemory::open(pid).with_context(|| format!("opening /proc/{pid}/mem"))?;
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
            LineFormat::Lnotab => linetable::line_from_lnotab(
                &info.line_table,
                info.first_line,
                frame.instr & 0xffff_ffff,
            ),
            LineFormat::Linetable310 => linetable::line_from_linetable_310(
                &info.line_table,
                info.first_line,
                (frame.instr & 0xffff_ffff) * 2,
            ),
            LineFormat::Locations => {
                let start = frame.code + layout.code_adaptive;
                let index = frame.instr.saturating_sub(start) / 2;
                linetable::line_from_locations(&info.line_table, info.first_line, index)
            }
        };
        Frame {
            function: info.function.clone(),
            file: info.file.clone(),
            line: line.unwrap_or(info.first_line),
        }
    }
}

/// Longest `str` read (function and file names).
const MAX_STR_LEN: usize = 4096;
/// Largest `bytes` read (line tables).
const MAX_BYTES_LEN: usize = 1 << 20;

fn read_code(mem: &ProcessMemory, layout: &CodeOffsets, code: u64) -> Result<CodeInfo> {
    let filename = mem.u64(code + layout.filename)?;
    let name = mem.u64(code + layout.name)?;
    let first_line = i64::from(mem.i32(code + layout.first_line)?);
    let table = mem.u64(code + layout.line_table)?;
    Ok(CodeInfo {
        function: read_str(mem, layout, name)?,
        file: read_str(mem, layout, filename)?,
        first_line,
        line_table: read_bytes_object(mem, table)?,
    })
}

/// A compact `str`: length at +16, ASCII payload after the header.
fn read_str(mem: &ProcessMemory, layout: &CodeOffsets, addr: u64) -> Result<String> {
    let length = mem.length(addr + 16, MAX_STR_LEN)?;
    let state = mem.u8(addr + 32)?;
    let ascii = state & 0x40 != 0;
    if !ascii {
        return Ok("<non-ascii>".into());
    }
    let bytes = mem.bytes(addr + layout.ascii_data, length)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A `bytes` object: size at +16, payload at +32.
fn read_bytes_object(mem: &ProcessMemory, addr: u64) -> Result<Vec<u8>> {
    let size = mem.length(addr + 16, MAX_BYTES_LEN)?;
    Ok(mem.bytes(addr + 32, size)?)
}
