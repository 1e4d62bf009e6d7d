//! Where each CPython version keeps what a stack walk reads: the thread
//! state holding the GIL, its current frame, and the code object's name,
//! file and line table.
use pymem_common::NO_OFFSET;

use super::PyVersion;
use crate::discover::Interpreter;

/// Per-version offsets (x86-64, default GIL builds), checked against the
/// interpreters' own debug info in the tests. For 3.13+ the binary's own
/// `_Py_DebugOffsets` override them where it has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VersionOffsets {
    /// Offset in `_PyRuntime` where the chain to the GIL holder's thread
    /// state starts (`gilstate.tstate_current` up to 3.11,
    /// `interpreters.head` since 3.12).
    pub(crate) runtime_tstate_chain: u64,
    /// 3.12+: `PyInterpreterState.ceval.gil`, `_gil_runtime_state.last_holder`.
    pub(crate) tstate_deref: [u64; 2],
    pub(crate) frame_owner: u64,
    /// Owner values from this one up mark frames that are not Python
    /// functions: `FRAME_OWNED_BY_CSTACK` (3.12, 3.13: 3), and 3.14's
    /// `FRAME_OWNED_BY_INTERPRETER` (3) and `FRAME_OWNED_BY_CSTACK` (4).
    pub(crate) first_shim_owner: u64,
    pub(crate) tstate_frame: u64,
    pub(crate) cframe_frame: u64,
    pub(crate) frame_code: u64,
    pub(crate) frame_back: u64,
    pub(crate) frame_instr: u64,
    pub(crate) code: CodeOffsets,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeOffsets {
    pub(crate) filename: u64,
    pub(crate) name: u64,
    pub(crate) first_line: u64,
    pub(crate) line_table: u64,
    /// `co_code_adaptive` (3.11+: instructions live inside the code object).
    pub(crate) code_adaptive: u64,
    /// Payload offset of a compact ASCII str.
    pub(crate) ascii_data: u64,
    pub(crate) format: LineFormat,
    /// `co_names` (the tuple of global and attribute names the bytecode
    /// refers to by index) and the tuple naming the locals
    /// (`co_varnames`; 3.11+ `co_localsplusnames`).
    pub(crate) names: u64,
    pub(crate) locals: u64,
    /// `co_code`, the instructions' bytes object (3.8–3.10; 0 later, when
    /// they live inside the code object at `code_adaptive`).
    pub(crate) bytecode: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LineFormat {
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
pub(crate) fn offsets_for(interp: &Interpreter) -> Option<VersionOffsets> {
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

pub(crate) fn offsets(version: PyVersion) -> Option<VersionOffsets> {
    let old_code = |format| CodeOffsets {
        filename: 104,
        name: 112,
        first_line: 40,
        line_table: 120,
        code_adaptive: 0,
        ascii_data: 48,
        format,
        names: 64,
        locals: 72,
        bytecode: 48,
    };
    let new_code = |code_adaptive| CodeOffsets {
        filename: 112,
        name: 120,
        first_line: 68,
        line_table: 136,
        code_adaptive,
        ascii_data: 40,
        format: LineFormat::Locations,
        names: 32,
        locals: 96,
        bytecode: 0,
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
    // 3.12+ keep the current thread state in TLS; the GIL's last holder
    // is the thread that allocates (allocation needs the GIL). This is the
    // walk of 3.13 and later; 3.12 differs in its thread state.
    let gil_holder_walk = |runtime_tstate_chain, frame_owner, code_adaptive| VersionOffsets {
        runtime_tstate_chain,
        tstate_deref: [16, 8],
        frame_owner,
        first_shim_owner: 3,
        tstate_frame: 72,
        cframe_frame: NO_OFFSET,
        frame_code: 0,
        frame_back: 8,
        frame_instr: 56,
        code: new_code(code_adaptive),
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
                names: 32,
                locals: 96,
                bytecode: 0,
            },
        }),
        (3, 12) => Some(VersionOffsets {
            tstate_deref: [384, 8],
            tstate_frame: 56,
            cframe_frame: 0,
            ..gil_holder_walk(40, 70, 192)
        }),
        (3, 13) => Some(gil_holder_walk(632, 70, 200)),
        // f_executable is a tagged `_PyStackRef` (low bit): masked by the
        // kernel walk and the symbolizer.
        (3, 14) => Some(gil_holder_walk(808, 74, 208)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cpython::testing, discover::elf};

    /// The hard-coded 3.13/3.14 offsets are exactly what each binary's own
    /// `_Py_DebugOffsets` states.
    #[test]
    fn table_matches_each_binarys_debug_offsets() {
        for (path, name) in testing::debug_offset_interpreters_or_skip() {
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
