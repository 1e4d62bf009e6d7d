//! `_Py_DebugOffsets`, the table CPython 3.13+ writes at the start of
//! `_PyRuntime` for out-of-process tools: the binary's own statement of its
//! version, build and the offsets a stack walk reads.
use super::{BinaryImage, PyVersion};

/// The head of `_Py_DebugOffsets`, which starts `_PyRuntime` since 3.13:
/// written by CPython for out-of-process tools, so it is the most direct
/// statement of what the binary is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugOffsets {
    pub version: PyVersion,
    pub free_threaded: bool,
    /// The offsets a stack walk needs, for the versions whose
    /// `_Py_DebugOffsets` layout is known (3.13, 3.14).
    pub stack: Option<StackDebugOffsets>,
}

/// What `_Py_DebugOffsets` says about the structures a Python stack walk
/// reads (x86-64 byte offsets inside each structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackDebugOffsets {
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u64,
    /// `PyInterpreterState.ceval.gil` (a pointer).
    pub interp_ceval_gil: u64,
    /// `_gil_runtime_state.last_holder` inside the GIL's state.
    pub gil_last_holder: u64,
    pub tstate_next: u64,
    pub tstate_interp: u64,
    pub tstate_current_frame: u64,
    pub frame_previous: u64,
    pub frame_executable: u64,
    pub frame_instr_ptr: u64,
    pub frame_owner: u64,
    pub code_filename: u64,
    pub code_name: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    pub code_adaptive: u64,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII str's payload starts.
    pub ascii_object_size: u64,
}

/// Where each field sits inside `_Py_DebugOffsets` (Include/internal/
/// pycore_debug_offsets.h of that version), with the structure sizes each
/// offset must stay below.
struct DebugOffsetsLayout {
    runtime_size: usize,
    runtime_interpreters_head: usize,
    interp_size: usize,
    interp_threads_head: usize,
    interp_ceval_gil: usize,
    interp_gil_runtime_state: usize,
    interp_gil_holder: usize,
    tstate_size: usize,
    tstate_next: usize,
    tstate_interp: usize,
    tstate_current_frame: usize,
    frame_size: usize,
    frame_previous: usize,
    frame_executable: usize,
    frame_instr_ptr: usize,
    frame_owner: usize,
    code_size: usize,
    code_filename: usize,
    code_name: usize,
    code_linetable: usize,
    code_firstlineno: usize,
    code_adaptive: usize,
    unicode_asciiobject_size: usize,
}

fn debug_offsets_layout(version: PyVersion) -> Option<DebugOffsetsLayout> {
    match (version.major, version.minor) {
        (3, 13) => Some(DebugOffsetsLayout {
            runtime_size: 24,
            runtime_interpreters_head: 40,
            interp_size: 48,
            interp_threads_head: 72,
            interp_ceval_gil: 112,
            interp_gil_runtime_state: 120,
            interp_gil_holder: 144,
            tstate_size: 152,
            tstate_next: 168,
            tstate_interp: 176,
            tstate_current_frame: 184,
            frame_size: 224,
            frame_previous: 232,
            frame_executable: 240,
            frame_instr_ptr: 248,
            frame_owner: 264,
            code_size: 272,
            code_filename: 280,
            code_name: 288,
            code_linetable: 304,
            code_firstlineno: 312,
            code_adaptive: 344,
            unicode_asciiobject_size: 560,
        }),
        // 3.14 added interpreter_state.threads_main, code_object_generation
        // and tlbc_generation, interpreter_frame.stackpointer and
        // tlbc_index, code_object.co_tlbc and set_object.
        (3, 14) => Some(DebugOffsetsLayout {
            runtime_size: 24,
            runtime_interpreters_head: 40,
            interp_size: 48,
            interp_threads_head: 72,
            interp_ceval_gil: 120,
            interp_gil_runtime_state: 128,
            interp_gil_holder: 152,
            tstate_size: 176,
            tstate_next: 192,
            tstate_interp: 200,
            tstate_current_frame: 208,
            frame_size: 248,
            frame_previous: 256,
            frame_executable: 264,
            frame_instr_ptr: 272,
            frame_owner: 288,
            code_size: 312,
            code_filename: 320,
            code_name: 328,
            code_linetable: 344,
            code_firstlineno: 352,
            code_adaptive: 384,
            unicode_asciiobject_size: 640,
        }),
        _ => None,
    }
}

/// The stack offsets of a `_Py_DebugOffsets` image, `None` when its layout
/// is unknown or a value does not fit inside its structure (a layout read
/// at the wrong positions).
fn stack_debug_offsets(version: PyVersion, bytes: &[u8]) -> Option<StackDebugOffsets> {
    let at = debug_offsets_layout(version)?;
    let word = |pos: usize| word_at(bytes, pos);
    let within = |pos: usize, size: usize| {
        let (value, size) = (word(pos)?, word(size)?);
        (value < size).then_some(value)
    };
    let gil = within(at.interp_gil_runtime_state, at.interp_size)?;
    let holder = within(at.interp_gil_holder, at.interp_size)?;
    Some(StackDebugOffsets {
        runtime_interpreters_head: within(at.runtime_interpreters_head, at.runtime_size)?,
        interp_threads_head: within(at.interp_threads_head, at.interp_size)?,
        interp_ceval_gil: within(at.interp_ceval_gil, at.interp_size)?,
        gil_last_holder: holder.checked_sub(gil)?,
        tstate_next: within(at.tstate_next, at.tstate_size)?,
        tstate_interp: within(at.tstate_interp, at.tstate_size)?,
        tstate_current_frame: within(at.tstate_current_frame, at.tstate_size)?,
        frame_previous: within(at.frame_previous, at.frame_size)?,
        frame_executable: within(at.frame_executable, at.frame_size)?,
        frame_instr_ptr: within(at.frame_instr_ptr, at.frame_size)?,
        frame_owner: within(at.frame_owner, at.frame_size)?,
        code_filename: within(at.code_filename, at.code_size)?,
        code_name: within(at.code_name, at.code_size)?,
        code_linetable: within(at.code_linetable, at.code_size)?,
        code_firstlineno: within(at.code_firstlineno, at.code_size)?,
        code_adaptive: within(at.code_adaptive, at.code_size)?,
        ascii_object_size: word(at.unicode_asciiobject_size).filter(|&s| s > 0 && s <= 64)?,
    })
}

/// The little-endian `uint64_t` at `pos`.
fn word_at(bytes: &[u8], pos: usize) -> Option<u64> {
    bytes
        .get(pos..pos + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Bytes of `_Py_DebugOffsets` read: the largest known layout, up to the
/// unicode object's offsets.
const DEBUG_OFFSETS_READ: u64 = 648;

pub(crate) const DEBUG_OFFSETS_COOKIE: &[u8; 8] = b"xdebugpy";

/// `{ char cookie[8]; uint64_t version; uint64_t free_threaded; … }` from
/// `_PyRuntime`'s initializer in the file (plain integers: no relocation).
pub fn read_debug_offsets(image: &impl BinaryImage) -> Option<DebugOffsets> {
    let runtime = image.symbol("_PyRuntime")?;
    let bytes = image.bytes_at(runtime, 24)?;
    if &bytes[..8] != DEBUG_OFFSETS_COOKIE {
        return None;
    }
    let version = PyVersion::from_hex(word_at(bytes, 8)? as u32);
    let free_threaded = word_at(bytes, 16)? != 0;
    let stack = image
        .bytes_at(runtime, DEBUG_OFFSETS_READ)
        .filter(|_| !free_threaded)
        .and_then(|bytes| stack_debug_offsets(version, bytes));
    Some(DebugOffsets {
        version,
        free_threaded,
        stack,
    })
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, read::elf::ElfFile64};

    use super::*;
    use crate::{
        cpython::{testing, version::version_from_get_version},
        discover::elf::{self, ElfImage},
    };

    /// Ground truth: each interpreter's own `sys.version_info` agrees with
    /// every source in the binary, `_Py_DebugOffsets` included.
    #[test]
    fn debug_offsets_agree_with_py_version_on_313_and_later() {
        for (path, name) in testing::debug_offset_interpreters_or_skip() {
            let data = std::fs::read(&path).unwrap();
            let image = ElfImage::parse(&data).unwrap();
            let offsets = read_debug_offsets(&image)
                .unwrap_or_else(|| panic!("{}: no _Py_DebugOffsets", path.display()));
            assert!(!offsets.free_threaded, "{}", path.display());
            let interp = elf::analyze_bytes(&data, &name).unwrap();
            assert_eq!(interp.version, offsets.version, "{}", path.display());
            let string = version_from_get_version(&image, image.symbol("Py_GetVersion").unwrap());
            assert_eq!(string, Some(interp.version), "{}", path.display());
            eprintln!("{}: {} from every source", path.display(), interp.version);
        }
    }

    /// A real 3.13+ binary whose debug offsets are patched to claim another
    /// version must be refused, not guessed.
    #[test]
    fn refuses_a_binary_whose_debug_offsets_disagree_with_py_version() {
        let Some((path, name)) = testing::debug_offset_interpreters_or_skip()
            .into_iter()
            .next()
        else {
            return;
        };
        let mut data = std::fs::read(&path).unwrap();
        let runtime_at = {
            let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
            let section = elf.section_by_name(".PyRuntime").expect(".PyRuntime");
            section.file_range().unwrap().0 as usize
        };
        assert_eq!(&data[runtime_at..runtime_at + 8], DEBUG_OFFSETS_COOKIE);
        data[runtime_at + 10] -= 1; // the minor byte of PY_VERSION_HEX
        let err = elf::analyze_bytes(&data, &name).unwrap_err();
        assert!(format!("{err:#}").contains("disagree"), "{err:#}");
    }
}
