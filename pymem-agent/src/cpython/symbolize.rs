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

impl Frame {
    /// A frame whose code object could not be read.
    pub fn unknown() -> Self {
        Self {
            function: "<unknown>".into(),
            file: "<unknown>".into(),
            line: 0,
        }
    }

    pub fn is_unknown(&self) -> bool {
        *self == Self::unknown()
    }
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
    /// The words of the object this was read from (type, name, file name,
    /// line table pointers): an address reused by another object reads
    /// otherwise.
    identity: CodeIdentity,
}

/// What tells one code object from another at the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CodeIdentity {
    type_pointer: u64,
    name: u64,
    filename: u64,
    line_table: u64,
}

/// Code objects cached per process, and bytes of line tables among them:
/// past either, the cache starts afresh (a process creating code without
/// end, or a hostile one, cannot grow the agent).
const MAX_CACHED_CODE: usize = 20_000;
const MAX_CACHED_TABLE_BYTES: usize = 32 << 20;

/// Reads code objects out of one process, cached by address and checked
/// on each use.
pub struct Symbolizer {
    mem: ProcessMemory,
    layout: CodeOffsets,
    code: HashMap<u64, Option<CodeInfo>>,
    table_bytes: usize,
}

impl Symbolizer {
    pub fn new(pid: u32, layout: CodeOffsets) -> Result<Self> {
        let mem = ProcessMemory::open(pid).with_context(|| format!("opening /proc/{pid}/mem"))?;
        Ok(Self {
            mem,
            layout,
            code: HashMap::new(),
            table_bytes: 0,
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
        let stale = match self.code.get(&frame.code) {
            Some(Some(info)) => {
                identity(&self.mem, &layout, frame.code).ok() != Some(info.identity)
            }
            Some(None) => false,
            None => true,
        };
        if stale {
            if self.code.len() >= MAX_CACHED_CODE || self.table_bytes >= MAX_CACHED_TABLE_BYTES {
                self.code.clear();
                self.table_bytes = 0;
            }
            let info = read_code(&self.mem, &layout, frame.code).ok();
            self.table_bytes += info.as_ref().map_or(0, |i| i.line_table.len());
            self.code.insert(frame.code, info);
        }
        let Some(Some(info)) = self.code.get(&frame.code) else {
            return Frame::unknown();
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
                let start = frame.code.wrapping_add(layout.code_adaptive);
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

fn identity(mem: &ProcessMemory, layout: &CodeOffsets, code: u64) -> Result<CodeIdentity> {
    Ok(CodeIdentity {
        type_pointer: mem.u64(code.wrapping_add(8))?,
        name: mem.u64(code.wrapping_add(layout.name))?,
        filename: mem.u64(code.wrapping_add(layout.filename))?,
        line_table: mem.u64(code.wrapping_add(layout.line_table))?,
    })
}

fn read_code(mem: &ProcessMemory, layout: &CodeOffsets, code: u64) -> Result<CodeInfo> {
    let identity = identity(mem, layout, code)?;
    let first_line = i64::from(mem.i32(code.wrapping_add(layout.first_line))?);
    Ok(CodeInfo {
        function: read_str(mem, layout, identity.name)?,
        file: read_str(mem, layout, identity.filename)?,
        first_line,
        // A line table that cannot be read (a damaged size, a pointer into
        // nothing) costs the line, not the function and file: frames give
        // their first line.
        line_table: read_bytes_object(mem, identity.line_table).unwrap_or_default(),
        identity,
    })
}

/// A compact `str`: length at +16, ASCII payload after the header.
fn read_str(mem: &ProcessMemory, layout: &CodeOffsets, addr: u64) -> Result<String> {
    let length = mem.length(addr.wrapping_add(16), MAX_STR_LEN)?;
    let state = mem.u8(addr.wrapping_add(32))?;
    let ascii = state & 0x40 != 0;
    if !ascii {
        return Ok("<non-ascii>".into());
    }
    let bytes = mem.bytes(addr.wrapping_add(layout.ascii_data), length)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A `bytes` object: size at +16, payload at +32.
fn read_bytes_object(mem: &ProcessMemory, addr: u64) -> Result<Vec<u8>> {
    let size = mem.length(addr.wrapping_add(16), MAX_BYTES_LEN)?;
    Ok(mem.bytes(addr.wrapping_add(32), size)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpython::{offsets::offsets, testing, version::PyVersion};

    fn layout(minor: u8) -> CodeOffsets {
        let version = PyVersion {
            major: 3,
            minor,
            micro: 0,
        };
        offsets(version).expect("a table for 3.8-3.14").code
    }

    fn put(buf: &mut [u8], at: u64, value: u64) {
        let at = at as usize;
        buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Frames a hostile process could hand the kernel: code pointers at the
    /// top of the address space, into nothing, and at a "code object" whose
    /// name is huge and whose line table is 1 MiB of noise, each with
    /// extreme instruction pointers. Each symbolises to something, and the
    /// agent does not panic (this process stands in for the target).
    #[test]
    fn hostile_frames_symbolise_without_panicking() {
        let table_len = MAX_BYTES_LEN;
        let mut table = vec![0u8; 32 + table_len];
        put(&mut table, 16, table_len as u64);
        table[32..].copy_from_slice(&testing::garbage(0x9e37_79b9_7f4a_7c15, table_len));
        let mut name = vec![0u8; 64];
        put(&mut name, 16, u64::MAX);
        for minor in 8..=14 {
            let layout = layout(minor);
            let mut code = vec![0u8; 512];
            put(&mut code, layout.name, name.as_ptr() as u64);
            put(&mut code, layout.filename, name.as_ptr() as u64);
            put(&mut code, layout.line_table, table.as_ptr() as u64);
            let mut symbolizer = Symbolizer::new(std::process::id(), layout).unwrap();
            for code_at in [u64::MAX, u64::MAX - 64, 8, code.as_ptr() as u64] {
                for instr in [
                    0,
                    1,
                    u64::MAX,
                    u64::MAX / 2,
                    code_at,
                    code_at.wrapping_add(4096),
                ] {
                    let frame = symbolizer.frame(&PyFrame {
                        code: code_at,
                        instr,
                    });
                    assert_eq!(frame.function, "<unknown>", "3.{minor} {code_at:#x}");
                }
            }
            // The same code object with a readable name: the noise still
            // gives a line or the first line, never a panic.
            let mut good_name = vec![0u8; 128];
            put(&mut good_name, 16, 4);
            good_name[32] = 0x40 | 0x20 | 0x04 | 0x01;
            let data = layout.ascii_data as usize;
            good_name[data..data + 4].copy_from_slice(b"evil");
            put(&mut code, layout.name, good_name.as_ptr() as u64);
            put(&mut code, layout.filename, good_name.as_ptr() as u64);
            let mut symbolizer = Symbolizer::new(std::process::id(), layout).unwrap();
            for instr in [0, 7, u64::MAX, code.as_ptr() as u64 + 100] {
                let frame = symbolizer.frame(&PyFrame {
                    code: code.as_ptr() as u64,
                    instr,
                });
                assert_eq!(
                    (frame.function.as_str(), frame.file.as_str()),
                    ("evil", "evil")
                );
            }
            // A line table claiming 2^40 bytes, or pointing into nothing:
            // named, at the first line.
            let first_line = 4242i32;
            code[layout.first_line as usize..layout.first_line as usize + 4]
                .copy_from_slice(&first_line.to_le_bytes());
            let mut huge_table = vec![0u8; 64];
            put(&mut huge_table, 16, 1 << 40);
            for table_at in [huge_table.as_ptr() as u64, 8] {
                put(&mut code, layout.line_table, table_at);
                let mut symbolizer = Symbolizer::new(std::process::id(), layout).unwrap();
                let frame = symbolizer.frame(&PyFrame {
                    code: code.as_ptr() as u64,
                    instr: code.as_ptr() as u64 + 100,
                });
                assert_eq!(
                    (frame.function.as_str(), frame.line),
                    ("evil", i64::from(first_line)),
                    "3.{minor}, line table at {table_at:#x}"
                );
            }
            put(&mut code, layout.line_table, table.as_ptr() as u64);
            // Another object at the same address (the first freed, its
            // memory reused): read anew, not named from the cache.
            let mut other_name = good_name.clone();
            other_name[data..data + 4].copy_from_slice(b"good");
            put(&mut code, layout.name, other_name.as_ptr() as u64);
            let frame = symbolizer.frame(&PyFrame {
                code: code.as_ptr() as u64,
                instr: 0,
            });
            assert_eq!(
                frame.function, "good",
                "3.{minor}: a stale cache entry was used"
            );
        }
    }
}
