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

use crate::cpython::{
    BinaryImage, PyVersion, StackDebugOffsets,
    debug_offsets::read_debug_offsets,
    gc::{self, GcHooks},
    version::{is_free_threaded, read_version},
};

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
    /// Size of `_PyRuntime` from its symbol (0 when the symbol says none):
    /// the census searches it for the interpreter and GC state.
    pub runtime_size: u64,
    /// Every exported static type object (`PyDict_Type`, …): name and link
    /// address, the census's first known types (stripped builds keep them).
    pub static_types: Vec<(String, u64)>,
    /// Stack-walk offsets from the binary's own `_Py_DebugOffsets` (3.13+).
    pub stack_offsets: Option<StackDebugOffsets>,
    /// Link address of the first loadable segment (0 for PIE and .so).
    pub first_load_vaddr: u64,
    /// The garbage collector's probes.
    pub gc: GcHooks,
}

/// Symbols whose definition marks a file as a CPython interpreter (an
/// extension module only imports them).
const INTERPRETER_SYMBOLS: [&str; 2] = ["PyObject_Malloc", "Py_Initialize"];

/// Largest binary read for analysis: libpython and static interpreters are
/// tens of MiB; a file far larger is not an interpreter worth reading.
pub const MAX_BINARY_BYTES: u64 = 512 << 20;

/// Reads an interpreter binary. `name_hint` is the file name (used only when
/// the binary carries no version of its own, and for `t` builds).
///
/// The file is read, not mapped: its owner can truncate it at any time,
/// and a mapping would then kill the agent with SIGBUS.
pub fn analyze(path: &Path, name_hint: &str) -> Result<Interpreter> {
    // Most binaries a host runs are not Python, and some are hundreds of
    // MiB (browsers, compilers): their dynamic symbols say so without
    // reading the rest.
    triage(path)?;
    let data = read_binary(path)?;
    analyze_bytes(&data, name_hint)
}

/// Whether the file may be an interpreter, from its headers, `.dynsym` and
/// dynamic section alone, read on demand: the error `analyze_bytes` would
/// give when it cannot be.
fn triage(path: &Path) -> Result<()> {
    use object::{
        elf::{FileHeader64, SHN_UNDEF, SHT_DYNSYM},
        read::elf::{FileHeader as _, Sym as _},
    };
    use std::io::Read as _;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // An I/O failure is told apart from a file that is not an ELF (the
    // cache reads without saying why it could not).
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    if magic != *b"\x7fELF" {
        bail!("not an ELF file");
    }
    let cache = object::read::ReadCache::new(file);
    let header = FileHeader64::<object::Endianness>::parse(&cache)
        .map_err(|_| anyhow!("not an ELF file (or not a 64-bit one)"))?;
    let endian = header
        .endian()
        .map_err(|e| anyhow!("not an ELF file: {e}"))?;
    let sections = header
        .sections(endian, &cache)
        .map_err(|e| anyhow!("malformed ELF section table: {e}"))?;
    let dynsym = sections
        .symbols(endian, &cache, SHT_DYNSYM)
        .map_err(|e| anyhow!("malformed ELF .dynsym: {e}"))?;
    let mut defined = [false; INTERPRETER_SYMBOLS.len()];
    for symbol in dynsym.iter() {
        if symbol.st_shndx(endian) == SHN_UNDEF {
            continue;
        }
        let Ok(name) = symbol.name(endian, dynsym.strings()) else {
            continue;
        };
        for (wanted, found) in INTERPRETER_SYMBOLS.iter().zip(defined.iter_mut()) {
            *found |= name == wanted.as_bytes();
        }
    }
    if defined.iter().all(|&found| found) {
        return Ok(());
    }
    if needs_libpython(&sections, endian, &cache) {
        return Err(LinksLibpython.into());
    }
    bail!("not a CPython interpreter (does not define PyObject_Malloc/Py_Initialize)")
}

/// The whole file at `path`, at most [`MAX_BINARY_BYTES`].
pub fn read_binary(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_BINARY_BYTES {
        bail!(
            "{} is {len} bytes, more than the {MAX_BINARY_BYTES} an interpreter binary is read up to",
            path.display()
        );
    }
    // The size may change while reading (a file being rewritten): read no
    // more than the bound whatever it said.
    let mut data = Vec::with_capacity(len as usize);
    file.take(MAX_BINARY_BYTES + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > MAX_BINARY_BYTES {
        bail!(
            "{} grew past {MAX_BINARY_BYTES} bytes while being read",
            path.display()
        );
    }
    Ok(data)
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
    needs_libpython(elf.elf_section_table(), elf.endian(), elf.data())
}

/// Whether a dynamic section needs a `libpython3*` library.
fn needs_libpython<'data, R: object::ReadRef<'data>>(
    sections: &object::read::elf::SectionTable<
        'data,
        object::elf::FileHeader64<object::Endianness>,
        R,
    >,
    endian: object::Endianness,
    data: R,
) -> bool {
    let Ok(Some((dynamic, link))) = sections.dynamic(endian, data) else {
        return false;
    };
    let Ok(strings) = sections.strings(endian, data, link) else {
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
    let image = ElfImage::parse(data)?;
    if !INTERPRETER_SYMBOLS
        .iter()
        .all(|s| image.defined.contains_key(s))
    {
        if links_libpython(&image.elf) {
            return Err(LinksLibpython.into());
        }
        bail!("not a CPython interpreter (does not define PyObject_Malloc/Py_Initialize)");
    }
    let debug_offsets = read_debug_offsets(&image);
    let version = read_version(&image, debug_offsets, name_hint)?;
    if !version.is_supported() {
        bail!("unsupported Python version {version}");
    }
    let free_threaded =
        is_free_threaded(name_hint) || debug_offsets.is_some_and(|d| d.free_threaded);
    let elf = &image.elf;
    let stubs = plt_stubs(elf).context("resolving the PLT")?;
    let point = |name: &str| image.symbol(name).and_then(|a| probe_point(elf, a));
    Ok(Interpreter {
        version,
        free_threaded,
        stubs,
        trace_track: point("PyTraceMalloc_Track"),
        trace_untrack: point("PyTraceMalloc_Untrack"),
        runtime_vaddr: image.symbol("_PyRuntime"),
        runtime_size: image.symbol_size("_PyRuntime").unwrap_or(0),
        static_types: image.static_types(),
        stack_offsets: debug_offsets.and_then(|d| d.stack),
        first_load_vaddr: elf
            .segments()
            .map(|segment| segment.address())
            .min()
            .unwrap_or(0),
        gc: gc::hooks(elf, version),
    })
}

/// A parsed x86-64 ELF file with its defined dynamic symbols: what the
/// version detection in `cpython` reads through [`BinaryImage`].
pub struct ElfImage<'d> {
    elf: ElfFile64<'d, object::Endianness>,
    defined: HashMap<&'d str, u64>,
    sizes: HashMap<&'d str, u64>,
}

impl<'d> ElfImage<'d> {
    pub fn parse(data: &'d [u8]) -> Result<Self> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            bail!("not an ELF file");
        }
        let elf = ElfFile64::<object::Endianness>::parse(data)
            .map_err(|e| anyhow!("unreadable ELF: {e}"))?;
        if elf.architecture() != object::Architecture::X86_64 {
            bail!("unsupported architecture {:?}", elf.architecture());
        }
        let defined = elf
            .dynamic_symbols()
            .filter(|s| s.is_definition())
            .filter_map(|s| Some((s.name().ok()?, s.address())))
            .collect();
        let sizes = elf
            .dynamic_symbols()
            .filter(|s| s.is_definition())
            .filter_map(|s| Some((s.name().ok()?, s.size())))
            .collect();
        Ok(Self {
            elf,
            defined,
            sizes,
        })
    }

    /// The size a defined symbol declares.
    pub fn symbol_size(&self, name: &str) -> Option<u64> {
        self.sizes.get(name).copied()
    }

    /// Every defined data symbol named `Py*_Type` / `_Py*_Type`, sorted by
    /// name.
    pub fn static_types(&self) -> Vec<(String, u64)> {
        let mut types: Vec<(String, u64)> = self
            .defined
            .iter()
            .filter(|(name, _)| name.starts_with("Py") || name.starts_with("_Py"))
            .filter(|(name, _)| name.ends_with("_Type"))
            .filter(|(name, _)| self.sizes.get(*name).is_some_and(|&size| size >= 400))
            .map(|(name, &addr)| (name.to_string(), addr))
            .collect();
        types.sort();
        types
    }
}

impl BinaryImage for ElfImage<'_> {
    fn symbol(&self, name: &str) -> Option<u64> {
        self.defined.get(name).copied()
    }

    /// From the section holding all of `vaddr..vaddr + len`. Addresses come
    /// from the file (section headers, decoded operands): nothing may wrap.
    fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let end = vaddr.checked_add(len)?;
        self.elf.sections().find_map(|s| {
            if vaddr < s.address() || end > s.address().saturating_add(s.size()) {
                return None;
            }
            let data = s.data().ok()?;
            let start = usize::try_from(vaddr - s.address()).ok()?;
            data.get(start..start.checked_add(usize::try_from(len).ok()?)?)
        })
    }
}

/// Converts an ELF virtual address into a file offset via its section.
pub fn probe_point(elf: &ElfFile64<'_, object::Endianness>, vaddr: u64) -> Option<ProbePoint> {
    let section = elf.sections().find(|s| {
        s.kind() == SectionKind::Text && vaddr >= s.address() && vaddr - s.address() < s.size()
    })?;
    let (offset, _) = section.file_range()?;
    Some(ProbePoint {
        vaddr,
        file_offset: (vaddr - section.address()).checked_add(offset)?,
    })
}

/// Finds the PLT stubs through which the interpreter calls libc's allocator.
///
/// Every `jmp *slot(%rip)` in `.plt`, `.plt.sec` and `.plt.got` is decoded
/// (iced-x86), and its GOT slot is named by the JUMP_SLOT/GLOB_DAT relocation
/// that fills it. The probe goes on the stub's first instruction (the
/// `endbr64` of IBT stubs), so a return probe there sees the caller's return
/// address on top of the stack.
pub(crate) fn plt_stubs(elf: &ElfFile64<'_, object::Endianness>) -> Result<LibcStubs> {
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
                // The decoder's addresses wrap past the top of a section
                // placed there by a hostile file.
                let Some(stub_offset) = vaddr
                    .checked_sub(section.address())
                    .and_then(|at| at.checked_add(file_offset))
                else {
                    entry_start = None;
                    continue;
                };
                let point = ProbePoint {
                    vaddr,
                    file_offset: stub_offset,
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
mod tests {
    use super::*;
    use crate::cpython::testing;

    /// Ground truth: each pyenv interpreter's own `sys.version_info`.
    #[test]
    fn reads_the_version_of_every_pyenv_interpreter() {
        let mut checked = 0;
        for (lib, python) in testing::pyenv_libpythons_or_skip() {
            let name = testing::file_name(&lib);
            let truth = std::process::Command::new(&python)
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

    /// A user can truncate a library they own while it is being analysed:
    /// an error or an analysis, never a crash (a mapping dies of SIGBUS).
    #[test]
    fn a_binary_truncated_while_read_is_never_a_crash() {
        let (lib, _) = testing::pyenv_libpythons_or_skip()
            .into_iter()
            .next()
            .expect("a pyenv libpython");
        let real = std::fs::read(&lib).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let name = testing::file_name(&lib);
        let path = dir.path().join(&name);
        std::fs::write(&path, &real).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let truncator = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let mut cuts = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let len = real.len() as u64;
                    file.set_len(len / 2 - cuts % (len / 4)).unwrap();
                    std::thread::yield_now();
                    file.set_len(0).unwrap();
                    std::fs::write(&path, &real).unwrap();
                    cuts += 4099;
                }
            })
        };
        let (mut analysed, mut refused) = (0, 0);
        for _ in 0..40 {
            match analyze(&path, &name) {
                Ok(_) => analysed += 1,
                Err(_) => refused += 1,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        truncator.join().unwrap();
        assert_eq!(analysed + refused, 40);
        if let Err(e) = analyze(&path, &name) {
            panic!("the whole file again: {e:#}");
        }
    }

    #[test]
    fn a_binary_over_the_bound_is_refused_unread() {
        let (lib, _) = testing::pyenv_libpythons_or_skip()
            .into_iter()
            .next()
            .expect("a pyenv libpython");
        let name = testing::file_name(&lib);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(&name);
        std::fs::copy(&lib, &path).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Sparse: no disk used.
        file.set_len(MAX_BINARY_BYTES + 1).unwrap();
        let err = analyze(&path, &name).unwrap_err();
        assert!(format!("{err:#}").contains("more than"), "{err:#}");
    }

    /// A big binary that is not Python is judged from its dynamic symbols,
    /// not read whole: a 600 MiB one is refused as not Python, not as too
    /// big to read.
    #[test]
    fn big_binaries_that_are_not_python_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("browser");
        std::fs::copy("/bin/ls", &path).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(600 << 20).unwrap();
        let err = analyze(&path, "browser").unwrap_err();
        assert!(
            format!("{err:#}").contains("not a CPython interpreter"),
            "{err:#}"
        );
        let err = analyze(Path::new("/proc/self/cmdline"), "x").unwrap_err();
        assert!(format!("{err:#}").contains("not an ELF"), "{err:#}");
    }

    #[test]
    fn rejects_non_elf_and_truncated_elf() {
        let err = analyze_bytes(b"#!/bin/sh\necho hi\n", "python3").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
        let real = std::fs::read("/proc/self/exe").unwrap();
        let err = analyze_bytes(&real[..200], "python3").unwrap_err();
        assert!(err.to_string().contains("ELF"), "{err}");
    }

    /// Link addresses at the top of the address space, asked for or put
    /// there by the section headers: no arithmetic wraps.
    #[test]
    fn addresses_at_the_top_of_the_address_space_do_not_overflow() {
        let mut data = std::fs::read("/bin/ls").unwrap();
        let image = ElfImage::parse(&data).unwrap();
        assert_eq!(image.bytes_at(u64::MAX - 4, 16), None);
        assert_eq!(probe_point(&image.elf, u64::MAX), None);
        let headers = u64::from_le_bytes(data[0x28..0x30].try_into().unwrap()) as usize;
        let count = u16::from_le_bytes(data[0x3c..0x3e].try_into().unwrap()) as usize;
        for index in 1..count {
            let at = headers + index * 64 + 16;
            data[at..at + 8].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        }
        let image = ElfImage::parse(&data).unwrap();
        let _ = image.bytes_at(u64::MAX - 4, 2);
        let _ = probe_point(&image.elf, u64::MAX - 4);
        let _ = plt_stubs(&image.elf);
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
        let Some(path) = testing::debian_python_3_11() else {
            return;
        };
        let interp = analyze(&path, "python3.11").unwrap();
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
