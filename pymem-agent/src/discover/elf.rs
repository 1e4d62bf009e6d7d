//! What pymem needs to know about one interpreter binary (a static `python3.X`
//! executable or a shared `libpython3.X.so`), read from the ELF file alone so
//! that it works on stripped PGO/LTO builds: only `.dynsym`, the PLT and its
//! relocations are used, and they exist in every dynamically linked build.
use std::{collections::HashMap, fmt, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use object::{
    Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable, RelocationTarget,
    SectionKind,
    elf::{R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT},
    read::elf::Dyn as _,
    read::elf::ElfFile64,
};

/// A CPython version, from the binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl PyVersion {
    /// pymalloc's arena size: 256 KiB up to 3.9, 1 MiB since 3.10.
    pub fn arena_size(&self) -> u64 {
        if (self.major, self.minor) >= (3, 10) {
            1 << 20
        } else {
            256 << 10
        }
    }
}

/// A probe location inside the binary file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// Virtual address in the ELF (for logs).
    pub vaddr: u64,
    /// File offset, what the kernel's uprobe takes.
    pub file_offset: u64,
}

/// The libc entry points the interpreter calls through its PLT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LibcStubs {
    pub malloc: Option<ProbePoint>,
    pub calloc: Option<ProbePoint>,
    pub realloc: Option<ProbePoint>,
    pub free: Option<ProbePoint>,
    pub mmap: Option<ProbePoint>,
    pub munmap: Option<ProbePoint>,
}

/// Everything needed to attach to one interpreter binary.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub version: PyVersion,
    /// Free-threaded (PEP 703) build: mimalloc, no pymalloc arenas.
    pub free_threaded: bool,
    pub stubs: LibcStubs,
    pub trace_track: Option<ProbePoint>,
    pub trace_untrack: Option<ProbePoint>,
    /// Link address of `_PyRuntime` (exported since 3.7).
    pub runtime_vaddr: Option<u64>,
    /// Stack-walk offsets from the binary's own `_Py_DebugOffsets` (3.13+).
    pub stack_offsets: Option<StackDebugOffsets>,
    /// Link address of the first loadable segment (0 for PIE and .so).
    pub first_load_vaddr: u64,
}

/// Symbols whose definition marks a file as a CPython interpreter (an
/// extension module only imports them).
const INTERPRETER_SYMBOLS: [&str; 2] = ["PyObject_Malloc", "Py_Initialize"];

/// Reads an interpreter binary. `name_hint` is the file name (used only when
/// the binary carries no version of its own, and for `t` builds).
pub fn analyze(path: &Path, name_hint: &str) -> Result<Interpreter> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only private mapping; a binary changing under a running
    // process is already undefined behaviour for that process.
    let data = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    analyze_bytes(&data, name_hint)
}

/// The file is an executable that loads CPython from `libpython3.X.so`: the
/// interpreter is that library, once the loader has mapped it.
#[derive(Debug)]
pub struct LinksLibpython;

impl fmt::Display for LinksLibpython {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("links libpython dynamically")
    }
}

impl std::error::Error for LinksLibpython {}

/// Whether the ELF's dynamic section needs a `libpython3*` library.
fn links_libpython(elf: &ElfFile64<'_, object::Endianness>) -> bool {
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let Ok(Some((dynamic, link))) = sections.dynamic(endian, elf.data()) else {
        return false;
    };
    let Ok(strings) = sections.strings(endian, elf.data(), link) else {
        return false;
    };
    dynamic.iter().any(|entry| {
        entry.tag(endian) == object::elf::DT_NEEDED
            && entry
                .string(endian, strings)
                .is_ok_and(|name| name.starts_with(b"libpython3"))
    })
}

pub fn analyze_bytes(data: &[u8], name_hint: &str) -> Result<Interpreter> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    let elf =
        ElfFile64::<object::Endianness>::parse(data).map_err(|e| anyhow!("unreadable ELF: {e}"))?;
    if elf.architecture() != object::Architecture::X86_64 {
        bail!("unsupported architecture {:?}", elf.architecture());
    }
    let defined: HashMap<&str, u64> = elf
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| Some((s.name().ok()?, s.address())))
        .collect();
    if !INTERPRETER_SYMBOLS.iter().all(|s| defined.contains_key(s)) {
        if links_libpython(&elf) {
            return Err(LinksLibpython.into());
        }
        bail!("not a CPython interpreter (does not define PyObject_Malloc/Py_Initialize)");
    }
    let debug_offsets = read_debug_offsets(&elf, &defined);
    let version = read_version(&elf, &defined, debug_offsets, name_hint)?;
    if !(3..=3).contains(&version.major) || version.minor < 6 {
        bail!("unsupported Python version {version}");
    }
    let free_threaded =
        is_free_threaded(name_hint) || debug_offsets.is_some_and(|d| d.free_threaded);
    let stubs = plt_stubs(&elf).context("resolving the PLT")?;
    let point = |name: &str| defined.get(name).and_then(|&a| probe_point(&elf, a));
    Ok(Interpreter {
        version,
        free_threaded,
        stubs,
        trace_track: point("PyTraceMalloc_Track"),
        trace_untrack: point("PyTraceMalloc_Untrack"),
        runtime_vaddr: defined.get("_PyRuntime").copied(),
        stack_offsets: debug_offsets.and_then(|d| d.stack),
        first_load_vaddr: elf
            .segments()
            .map(|segment| segment.address())
            .min()
            .unwrap_or(0),
    })
}

/// Free-threaded builds carry the `t` ABI flag in their file names
/// (`python3.13t`, `libpython3.13t.so`).
fn is_free_threaded(name_hint: &str) -> bool {
    let stem = name_hint.split(".so").next().unwrap_or(name_hint);
    (stem.starts_with("python3.") || stem.starts_with("libpython3.")) && stem.ends_with('t')
}

/// Converts an ELF virtual address into a file offset via its section.
pub fn probe_point(elf: &ElfFile64<'_, object::Endianness>, vaddr: u64) -> Option<ProbePoint> {
    let section = elf.sections().find(|s| {
        s.kind() == SectionKind::Text && vaddr >= s.address() && vaddr < s.address() + s.size()
    })?;
    let (offset, _) = section.file_range()?;
    Some(ProbePoint {
        vaddr,
        file_offset: vaddr - section.address() + offset,
    })
}

/// Reads a value of `len` bytes at `vaddr` from the file image.
fn read_at<'d>(elf: &ElfFile64<'d, object::Endianness>, vaddr: u64, len: u64) -> Option<&'d [u8]> {
    elf.sections().find_map(|s| {
        if vaddr < s.address() || vaddr + len > s.address() + s.size() {
            return None;
        }
        let data = s.data().ok()?;
        let start = (vaddr - s.address()) as usize;
        data.get(start..start + len as usize)
    })
}

impl PyVersion {
    /// From PY_VERSION_HEX (`0x030d05f0` is 3.13.5 final).
    fn from_hex(hex: u32) -> Self {
        Self {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
        }
    }
}

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
    let word = |pos: usize| {
        bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
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

/// Bytes of `_Py_DebugOffsets` read: the largest known layout, up to the
/// unicode object's offsets.
const DEBUG_OFFSETS_READ: u64 = 648;

const DEBUG_OFFSETS_COOKIE: &[u8; 8] = b"xdebugpy";

/// `{ char cookie[8]; uint64_t version; uint64_t free_threaded; … }` from
/// `_PyRuntime`'s initializer in the file (plain integers: no relocation).
fn read_debug_offsets(
    elf: &ElfFile64<'_, object::Endianness>,
    defined: &HashMap<&str, u64>,
) -> Option<DebugOffsets> {
    let runtime = *defined.get("_PyRuntime")?;
    let bytes = read_at(elf, runtime, 24)?;
    if &bytes[..8] != DEBUG_OFFSETS_COOKIE {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = PyVersion::from_hex(word(8) as u32);
    let free_threaded = word(16) != 0;
    let stack = read_at(elf, runtime, DEBUG_OFFSETS_READ)
        .filter(|_| !free_threaded)
        .and_then(|bytes| stack_debug_offsets(version, bytes));
    Some(DebugOffsets {
        version,
        free_threaded,
        stack,
    })
}

/// Every place a binary states its version. A wrong version means wrong
/// arena sizes and stack offsets, so they must all agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VersionSources {
    /// `_Py_DebugOffsets.version` (3.13+).
    debug_offsets: Option<PyVersion>,
    /// The exported `Py_Version` (3.11+, PY_VERSION_HEX).
    py_version: Option<PyVersion>,
    /// The `PY_VERSION` string `Py_GetVersion` formats (every version).
    version_string: Option<PyVersion>,
    /// `python3.X` / `libpython3.X.so` in the file name: (major, minor).
    file_name: Option<(u8, u8)>,
}

impl VersionSources {
    /// The version when every source that exists agrees; the file name
    /// only says major.minor. Refuses (with all sources named) otherwise.
    fn settle(&self) -> Result<PyVersion> {
        let stated = [
            ("_Py_DebugOffsets", self.debug_offsets),
            ("Py_Version", self.py_version),
            ("the Py_GetVersion string", self.version_string),
        ];
        let Some(version) = stated.iter().find_map(|(_, v)| *v) else {
            bail!("no _Py_DebugOffsets, no Py_Version and no version string in Py_GetVersion");
        };
        let binary_agrees = stated.iter().all(|(_, v)| v.is_none_or(|v| v == version));
        let name_agrees = self
            .file_name
            .is_none_or(|minor| minor == (version.major, version.minor));
        if binary_agrees && name_agrees {
            return Ok(version);
        }
        let mut said: Vec<String> = stated
            .iter()
            .filter_map(|(source, v)| Some(format!("{source} says {}", (*v)?)))
            .collect();
        if let Some((major, minor)) = self.file_name {
            said.push(format!("the file name says {major}.{minor}"));
        }
        bail!(
            "version sources disagree ({}); not guessing, since a wrong version means wrong arena sizes and stack layouts",
            said.join(", ")
        )
    }
}

/// Reads every version source of the binary and settles on one.
fn read_version(
    elf: &ElfFile64<'_, object::Endianness>,
    defined: &HashMap<&str, u64>,
    debug_offsets: Option<DebugOffsets>,
    name_hint: &str,
) -> Result<PyVersion> {
    let py_version = defined
        .get("Py_Version")
        .and_then(|&addr| read_at(elf, addr, 4))
        .map(|bytes| PyVersion::from_hex(u32::from_le_bytes(bytes.try_into().expect("4 bytes"))));
    let version_string = defined
        .get("Py_GetVersion")
        .and_then(|&addr| version_from_get_version(elf, addr));
    let sources = VersionSources {
        debug_offsets: debug_offsets.map(|d| d.version),
        py_version,
        version_string,
        file_name: version_in_file_name(name_hint),
    };
    sources
        .settle()
        .with_context(|| format!("file {name_hint:?}"))
}

/// `python3.11`, `libpython3.13t.so.1.0`, `python3.9-dbg` -> (3, minor);
/// `python3`, `python` and other names say nothing.
fn version_in_file_name(name: &str) -> Option<(u8, u8)> {
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((3, digits.parse().ok()?))
}

/// Looks at the strings `Py_GetVersion` passes to its `snprintf` — RIP-
/// relative `lea`s in PIE/shared builds, absolute immediates (`mov $addr,
/// %ecx`) in non-PIE executables — and returns the first reading `3.X.Y`.
fn version_from_get_version(
    elf: &ElfFile64<'_, object::Endianness>,
    addr: u64,
) -> Option<PyVersion> {
    let code = read_at(elf, addr, 128)?;
    let decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for instr in decoder.into_iter().take(40) {
        let target = if instr.mnemonic() == Mnemonic::Lea && instr.memory_base() == Register::RIP {
            instr.ip_rel_memory_address()
        } else if instr.mnemonic() == Mnemonic::Mov
            && instr.op_count() == 2
            && matches!(
                instr.op1_kind(),
                OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
            )
        {
            instr.immediate(1)
        } else {
            continue;
        };
        let Some(bytes) = read_at(elf, target, 16) else {
            continue;
        };
        let text: String = bytes
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect();
        if let Some(version) = parse_version(&text) {
            return Some(version);
        }
    }
    None
}

/// `3.8.18` (optionally followed by a tag such as `+` or `rc1`).
fn parse_version(text: &str) -> Option<PyVersion> {
    let mut parts = text.splitn(3, '.');
    let major: u8 = parts.next()?.parse().ok()?;
    let minor: u8 = parts.next()?.parse().ok()?;
    let micro_text = parts.next()?;
    let digits: String = micro_text
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let micro: u8 = digits.parse().ok()?;
    (major == 3).then_some(PyVersion {
        major,
        minor,
        micro,
    })
}

/// Finds the PLT stubs through which the interpreter calls libc's allocator.
///
/// Every `jmp *slot(%rip)` in `.plt`, `.plt.sec` and `.plt.got` is decoded
/// (iced-x86), and its GOT slot is named by the JUMP_SLOT/GLOB_DAT relocation
/// that fills it. The probe goes on the stub's first instruction (the
/// `endbr64` of IBT stubs), so a return probe there sees the caller's return
/// address on top of the stack.
fn plt_stubs(elf: &ElfFile64<'_, object::Endianness>) -> Result<LibcStubs> {
    let mut slot_names: HashMap<u64, String> = HashMap::new();
    for (offset, reloc) in elf.dynamic_relocations().into_iter().flatten() {
        let object::RelocationFlags::Elf { r_type } = reloc.flags() else {
            continue;
        };
        if r_type != R_X86_64_JUMP_SLOT && r_type != R_X86_64_GLOB_DAT {
            continue;
        }
        if let RelocationTarget::Symbol(index) = reloc.target()
            && let Ok(symbol) = elf
                .dynamic_symbol_table()
                .context("no .dynsym")?
                .symbol_by_index(index)
            && let Ok(name) = symbol.name()
        {
            // Versioned names: `malloc@GLIBC_2.2.5` -> `malloc`.
            let base = name.split('@').next().unwrap_or(name);
            slot_names.insert(offset, base.to_string());
        }
    }
    let mut stubs = LibcStubs::default();
    for section in elf.sections() {
        let Ok(name) = section.name() else { continue };
        if !matches!(name, ".plt" | ".plt.sec" | ".plt.got") {
            continue;
        }
        let code = section.data().map_err(|e| anyhow!("{name}: {e}"))?;
        let Some((file_offset, _)) = section.file_range() else {
            continue;
        };
        let mut decoder = Decoder::with_ip(64, code, section.address(), DecoderOptions::NONE);
        let mut entry_start: Option<u64> = None;
        for instr in &mut decoder {
            if instr.code() == Code::Endbr64 {
                entry_start = Some(instr.ip());
                continue;
            }
            let is_slot_jump = instr.mnemonic() == Mnemonic::Jmp
                && instr.op_count() == 1
                && instr.op0_kind() == OpKind::Memory
                && instr.memory_base() == Register::RIP;
            if is_slot_jump && let Some(target) = slot_names.get(&instr.ip_rel_memory_address()) {
                let vaddr = entry_start.unwrap_or(instr.ip());
                let point = ProbePoint {
                    vaddr,
                    file_offset: vaddr - section.address() + file_offset,
                };
                let slot = match target.as_str() {
                    "malloc" => &mut stubs.malloc,
                    "calloc" => &mut stubs.calloc,
                    "realloc" => &mut stubs.realloc,
                    "free" => &mut stubs.free,
                    "mmap" | "mmap64" => &mut stubs.mmap,
                    "munmap" => &mut stubs.munmap,
                    _ => {
                        entry_start = None;
                        continue;
                    }
                };
                slot.get_or_insert(point);
            }
            entry_start = None;
        }
    }
    Ok(stubs)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn version_strings() {
        assert_eq!(
            parse_version("3.8.18"),
            Some(PyVersion {
                major: 3,
                minor: 8,
                micro: 18
            })
        );
        assert_eq!(parse_version("3.9.2+").map(|v| v.micro), Some(2));
        assert_eq!(parse_version("%.80s (%.80s) %.80s"), None);
    }

    /// Ground truth: each pyenv interpreter's own `sys.version_info`.
    #[test]
    fn reads_the_version_of_every_pyenv_interpreter() {
        let root = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".pyenv/versions");
        let Ok(entries) = std::fs::read_dir(&root) else {
            eprintln!("SKIP: no pyenv at {}", root.display());
            return;
        };
        let mut checked = 0;
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(lib) = std::fs::read_dir(dir.join("lib")).ok().and_then(|it| {
                it.flatten().map(|e| e.path()).find(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    name.starts_with("libpython3") && name.contains(".so.")
                })
            }) else {
                continue;
            };
            let name = lib.file_name().unwrap().to_string_lossy().into_owned();
            let truth = std::process::Command::new(dir.join("bin/python3"))
                .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
                .output()
                .unwrap();
            let truth = String::from_utf8_lossy(&truth.stdout).trim().to_string();
            let interp =
                analyze(&lib, &name).unwrap_or_else(|e| panic!("{}: {e:#}", lib.display()));
            assert_eq!(interp.version.to_string(), truth, "{}", lib.display());
            assert!(interp.stubs.malloc.is_some() && interp.stubs.free.is_some());
            assert!(interp.stubs.mmap.is_some() && interp.stubs.munmap.is_some());
            checked += 1;
        }
        assert!(checked >= 3, "only {checked} pyenv interpreters found");
    }

    fn v(major: u8, minor: u8, micro: u8) -> PyVersion {
        PyVersion {
            major,
            minor,
            micro,
        }
    }

    #[test]
    fn version_sources_must_agree() {
        let agreeing = VersionSources {
            debug_offsets: Some(v(3, 13, 5)),
            py_version: Some(v(3, 13, 5)),
            version_string: Some(v(3, 13, 5)),
            file_name: Some((3, 13)),
        };
        assert_eq!(agreeing.settle().unwrap(), v(3, 13, 5));
        let only_string = VersionSources {
            version_string: Some(v(3, 8, 18)),
            ..Default::default()
        };
        assert_eq!(only_string.settle().unwrap(), v(3, 8, 18));
        let renamed = VersionSources {
            file_name: Some((3, 11)),
            ..agreeing
        };
        let err = renamed.settle().unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        assert!(err.contains("file name says 3.11"), "{err}");
        let patched = VersionSources {
            debug_offsets: Some(v(3, 12, 1)),
            ..agreeing
        };
        let err = patched.settle().unwrap_err().to_string();
        assert!(err.contains("_Py_DebugOffsets says 3.12.1"), "{err}");
        assert!(VersionSources::default().settle().is_err());
    }

    #[test]
    fn version_in_file_names() {
        assert_eq!(version_in_file_name("python3.11"), Some((3, 11)));
        assert_eq!(version_in_file_name("libpython3.13t.so.1.0"), Some((3, 13)));
        assert_eq!(version_in_file_name("python3.9-dbg"), Some((3, 9)));
        assert_eq!(version_in_file_name("python3"), None);
        assert_eq!(version_in_file_name("python"), None);
        assert_eq!(version_in_file_name("uwsgi"), None);
    }

    /// 3.13+ interpreters on this machine: pyenv's shared 3.13 and the
    /// Debian static stripped builds inside the test root filesystems.
    pub(crate) fn debug_offset_interpreters() -> Vec<(std::path::PathBuf, String)> {
        let home = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default());
        let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/rootfs");
        let mut found = Vec::new();
        if let Ok(versions) = std::fs::read_dir(home.join(".pyenv/versions")) {
            for dir in versions.flatten().map(|e| e.path()) {
                let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                let Some(minor) = name.strip_prefix("3.").and_then(|r| r.split('.').next()) else {
                    continue;
                };
                if minor.parse::<u8>().is_ok_and(|m| m >= 13) && !name.ends_with('t') {
                    let lib = format!("libpython3.{minor}.so.1.0");
                    found.push((dir.join("lib").join(&lib), lib));
                }
            }
        }
        for (suite, python) in [("trixie", "python3.13"), ("sid", "python3.14")] {
            found.push((
                rootfs.join(suite).join("usr/bin").join(python),
                python.into(),
            ));
        }
        found.retain(|(path, _)| path.exists());
        found
    }

    /// Ground truth: each interpreter's own `sys.version_info` agrees with
    /// every source in the binary, `_Py_DebugOffsets` included.
    #[test]
    fn debug_offsets_agree_with_py_version_on_313_and_later() {
        let interpreters = debug_offset_interpreters();
        if interpreters.is_empty() {
            eprintln!("SKIP: no Python 3.13+ here (pyenv or .cache/rootfs)");
            return;
        }
        for (path, name) in interpreters {
            let data = std::fs::read(&path).unwrap();
            let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
            let defined: HashMap<&str, u64> = elf
                .dynamic_symbols()
                .filter(|s| s.is_definition())
                .filter_map(|s| Some((s.name().ok()?, s.address())))
                .collect();
            let offsets = read_debug_offsets(&elf, &defined)
                .unwrap_or_else(|| panic!("{}: no _Py_DebugOffsets", path.display()));
            assert!(!offsets.free_threaded, "{}", path.display());
            let interp = analyze_bytes(&data, &name).unwrap();
            assert_eq!(interp.version, offsets.version, "{}", path.display());
            let string = version_from_get_version(&elf, defined["Py_GetVersion"]);
            assert_eq!(string, Some(interp.version), "{}", path.display());
            eprintln!("{}: {} from every source", path.display(), interp.version);
        }
    }

    /// A real 3.13+ binary whose debug offsets are patched to claim another
    /// version must be refused, not guessed.
    #[test]
    fn refuses_a_binary_whose_debug_offsets_disagree_with_py_version() {
        let Some((path, name)) = debug_offset_interpreters().into_iter().next() else {
            eprintln!("SKIP: no Python 3.13+ here (pyenv or .cache/rootfs)");
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
        let err = analyze_bytes(&data, &name).unwrap_err();
        assert!(format!("{err:#}").contains("disagree"), "{err:#}");
    }

    /// A renamed binary: the file name claims one version, the binary says
    /// another.
    #[test]
    fn refuses_a_binary_named_for_another_version() {
        let path = Path::new("/usr/bin/python3.11");
        if !path.exists() {
            eprintln!("SKIP: /usr/bin/python3.11 is not installed");
            return;
        }
        let err = analyze(path, "python3.10").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("file name says 3.10"), "{text}");
        assert!(text.contains("Py_Version says 3.11"), "{text}");
    }

    #[test]
    fn free_threaded_names() {
        assert!(is_free_threaded("python3.13t"));
        assert!(is_free_threaded("libpython3.14t.so.1.0"));
        assert!(!is_free_threaded("python3.11"));
        assert!(!is_free_threaded("libpython3.11.so.1.0"));
        assert!(!is_free_threaded("python3"));
    }

    #[test]
    fn rejects_non_elf_and_truncated_elf() {
        let err = analyze_bytes(b"#!/bin/sh\necho hi\n", "python3").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
        let real = std::fs::read("/proc/self/exe").unwrap();
        let err = analyze_bytes(&real[..200], "python3").unwrap_err();
        assert!(err.to_string().contains("ELF"), "{err}");
    }

    #[test]
    fn rejects_elf_that_is_not_python() {
        let real = std::fs::read("/bin/ls").unwrap();
        let err = analyze_bytes(&real, "ls").unwrap_err();
        assert!(
            err.to_string().contains("not a CPython interpreter"),
            "{err}"
        );
    }

    /// Ground truth from the system's own tools: objdump names the PLT stubs
    /// (`<malloc@plt>`) in Debian's stripped PGO build.
    #[test]
    fn finds_plt_stubs_in_stripped_debian_python() {
        let path = Path::new("/usr/bin/python3.11");
        if !path.exists() {
            eprintln!("SKIP: /usr/bin/python3.11 is not installed");
            return;
        }
        let interp = analyze(path, "python3.11").unwrap();
        assert_eq!((interp.version.major, interp.version.minor), (3, 11));
        let dis = std::process::Command::new("objdump")
            .args(["-d", "-j", ".plt", "-j", ".plt.sec", "/usr/bin/python3.11"])
            .output()
            .unwrap();
        let dis = String::from_utf8_lossy(&dis.stdout);
        for (name, point) in [
            ("malloc", interp.stubs.malloc),
            ("free", interp.stubs.free),
            ("realloc", interp.stubs.realloc),
            ("calloc", interp.stubs.calloc),
            ("munmap", interp.stubs.munmap),
        ] {
            let point = point.unwrap_or_else(|| panic!("{name} stub not found"));
            let label = format!("{:016x} <{name}@plt>:", point.vaddr);
            assert!(dis.contains(&label), "objdump has no {label}");
        }
        assert!(interp.stubs.mmap.is_some());
        assert!(interp.trace_track.is_some() && interp.trace_untrack.is_some());
    }
}
