//! Entry points of the fuzz targets (`fuzz/` at the repository root): each
//! turns arbitrary bytes into what the agent reads from an untrusted binary
//! or process, and runs the agent's own parser on it. Whatever the bytes,
//! the parsers must return (an error is fine), never panic, loop or
//! allocate without bound. Not part of the agent's interface.
//!
//! The input formats are documented on each function; `fuzz/seeds.py`
//! writes them from real interpreters.
use std::sync::{Mutex, OnceLock};

use object::read::elf::ElfFile64;
use pymem_common::{PyFrame, cookie};

use crate::{
    cpython::{
        BinaryImage, PyVersion,
        bytecode::Opcodes,
        debug_offsets::read_debug_offsets,
        gc,
        heap::{Bytes, CensusError, CensusTarget, HeapCensus, HeapImage, Region, take_census},
        linetable,
        offsets::offsets,
        symbolize::Symbolizer,
        version::read_version,
    },
    discover::{elf, usdt},
};

/// Little-endian fields read off the front of the input; zeros once it
/// runs out, so that every input decodes to something.
struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// A supported CPython minor version (3.8–3.14) chosen by one byte.
fn minor_from(selector: u8) -> u8 {
    8 + selector % 7
}

fn version(minor: u8) -> PyVersion {
    PyVersion {
        major: 3,
        minor,
        micro: 0,
    }
}

/// An ELF file, whole: the binary analysis `discover` runs on every
/// interpreter it finds, then the parts it reaches only for binaries that
/// pass its checks (the PLT, USDT notes, the collector's hooks) run on the
/// file whatever it is.
pub fn elf_file(data: &[u8]) {
    let _ = elf::analyze_bytes(data, "python3");
    let Ok(image) = elf::ElfImage::parse(data) else {
        return;
    };
    let debug_offsets = read_debug_offsets(&image);
    let _ = read_version(&image, debug_offsets, "python3");
    let _ = image.static_types();
    let Ok(file) = ElfFile64::<object::Endianness>::parse(data) else {
        return;
    };
    let _ = elf::plt_stubs(&file);
    for minor in [9, 12] {
        let _ = gc::hooks(&file, version(minor));
    }
    for probe in usdt::probes(&file) {
        let _ = usdt::file_offset(&file, probe.semaphore_vaddr);
        let _ = elf::probe_point(&file, probe.vaddr);
        for argument in &probe.arguments {
            let _ = usdt::argument_cookie(cookie::GC_START, argument);
        }
    }
}

/// A binary's initialised bytes at one link address, as version detection
/// reads them. Input: `u16` offset of `Py_GetVersion` in the bytes, then the
/// bytes, which start at `_PyRuntime` (with `_Py_DebugOffsets`) and hold
/// `Py_Version` at 8, where `_Py_DebugOffsets.version` is.
pub fn binary_image(data: &[u8]) {
    let mut fields = Fields { data };
    let get_version = u64::from(fields.u16());
    let image = FakeBinary {
        base: FAKE_BINARY_BASE,
        bytes: fields.rest(),
        get_version,
    };
    let debug_offsets = read_debug_offsets(&image);
    for name in ["python3", "libpython3.13.so.1.0", "python3.8"] {
        let _ = read_version(&image, debug_offsets, name);
    }
}

/// Link address of a [`FakeBinary`]'s bytes: high enough that the code's
/// RIP-relative and absolute operands can reach below and above it.
const FAKE_BINARY_BASE: u64 = 0x40_0000;

struct FakeBinary<'a> {
    base: u64,
    bytes: &'a [u8],
    get_version: u64,
}

impl BinaryImage for FakeBinary<'_> {
    fn symbol(&self, name: &str) -> Option<u64> {
        match name {
            "_PyRuntime" => Some(self.base),
            "Py_Version" => Some(self.base + 8),
            "Py_GetVersion" => Some(self.base + self.get_version),
            _ => None,
        }
    }

    fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(vaddr.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.bytes.get(start..end)
    }
}

/// One `.note.stapsdt` descriptor and its argument specifications.
/// Input: a `u64` where `.stapsdt.base` is now (0: no such section), then
/// the descriptor.
pub fn usdt_note(data: &[u8]) {
    let mut fields = Fields { data };
    let base = fields.u64();
    let desc = fields.rest();
    if let Some(probe) = usdt::parse_note(desc, (base != 0).then_some(base)) {
        for argument in &probe.arguments {
            let _ = usdt::argument_cookie(cookie::GC_DONE, argument);
        }
    }
}

/// A line table in every format. Input: `i32` first line, `u64` offset,
/// then the table; each format is asked for that offset and the first 64.
pub fn line_tables(data: &[u8]) {
    let mut fields = Fields { data };
    let first_line = i64::from(fields.u32() as i32);
    let asked = fields.u64();
    let table = fields.rest();
    for offset in (0..64).chain([asked]) {
        let _ = linetable::line_from_lnotab(table, first_line, offset);
        let _ = linetable::line_from_linetable_310(table, first_line, offset);
        let _ = linetable::line_from_locations(table, first_line, offset);
    }
}

/// Words of the fake target memory with these top 16 bits are pointers into
/// it: the low bits (within [`FAKE_WINDOW`]) are an offset from its start.
/// Real seeds rewrite their pointers so; any other word is left as it is
/// (and reads this process's memory, or nothing).
pub const FAKE_POINTER_TAG: u64 = 0xfa4e << 48;
/// Bytes of the fake memory an input fills, and the reach of its pointers.
pub const FAKE_WINDOW: usize = 2 << 20;
/// The fake memory's size: the window plus the most one read takes past a
/// pointer (a 1 MiB line table), so that every read stays inside it.
const FAKE_MEMORY: usize = 2 * FAKE_WINDOW;

fn relocate(word: u64, base: u64) -> u64 {
    if word & !0 << 48 == FAKE_POINTER_TAG {
        base + (word & (FAKE_WINDOW as u64 - 1))
    } else {
        word
    }
}

/// The symbolizer reading code objects out of a target's memory, this
/// process standing in for the target. Input: a selector of the version's
/// layout, a frame count (1–8), the frames (`u64` code pointer, `u64`
/// instruction pointer or offset), then the memory the pointers reach (see
/// [`FAKE_POINTER_TAG`]).
pub fn symbolize(data: &[u8]) {
    static MEMORY: OnceLock<Mutex<memmap2::MmapMut>> = OnceLock::new();
    let memory = MEMORY.get_or_init(|| {
        Mutex::new(memmap2::MmapMut::map_anon(FAKE_MEMORY).expect("an anonymous mapping"))
    });
    let mut memory = memory
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let base = memory.as_ptr() as u64;
    let mut fields = Fields { data };
    let minor = minor_from(fields.u8());
    let count = usize::from(fields.u8() % 8) + 1;
    let frames: Vec<PyFrame> = (0..count)
        .map(|_| PyFrame {
            code: relocate(fields.u64(), base),
            instr: relocate(fields.u64(), base),
        })
        .collect();
    let blob = fields.rest();
    let blob = &blob[..blob.len().min(FAKE_WINDOW)];
    memory[..FAKE_WINDOW].fill(0);
    memory[..blob.len()].copy_from_slice(blob);
    for at in (0..blob.len() / 8 * 8).step_by(8) {
        let word = u64::from_le_bytes(memory[at..at + 8].try_into().expect("8 bytes"));
        memory[at..at + 8].copy_from_slice(&relocate(word, base).to_le_bytes());
    }
    let layout = offsets(version(minor)).expect("a table for 3.8-3.14").code;
    let mut symbolizer =
        Symbolizer::new(std::process::id(), layout).expect("this process's memory");
    let _ = symbolizer.stack(&frames);
    // Again, from the cache: entries are checked against the memory.
    for frame in &frames {
        let _ = symbolizer.frame(frame);
    }
}

/// Bytecode, as the census's writer search decodes it. Input: a selector
/// of the version, then the code units.
pub fn bytecode(data: &[u8]) {
    let mut fields = Fields { data };
    let minor = minor_from(fields.u8());
    let Some(opcodes) = Opcodes::for_minor(minor) else {
        return;
    };
    let instructions = opcodes.decode(fields.rest());
    let names = [Some("CACHE"), None, Some("append"), Some("self")];
    let _ = opcodes.stores(&instructions, &names, &names[1..]);
}

/// Largest copy a census input describes: its regions are zero-filled
/// anonymous mappings, so only the bytes written cost anything.
const MAX_CENSUS_COPY: u64 = 64 << 20;

/// The object census of a heap copy. Input (little-endian):
///
/// - `u8` version selector, `u8` flags (1: free-threaded, 2: interpreters'
///   head offset known, 4: threads' head offset known, 8: frame offsets
///   known), `u64` `_PyRuntime` address, `u64` its size, `u64` interpreters'
///   head offset, `u64` threads' head offset;
/// - `u16` count of static types, each `u8` name length, name, `u64` address;
/// - then regions to the end, each `u64` start, `u32` size, `u8` anonymous,
///   `u16` count of chunks, each `u32` offset in the region, `u32` length,
///   bytes (the rest of the region is zeros).
///
/// [`census_input`] writes one from a real copy.
pub fn census(data: &[u8]) {
    let _ = census_of(data);
}

/// The census of a [`census`] input, if it decodes.
pub fn census_of(data: &[u8]) -> Option<Result<HeapCensus, CensusError>> {
    let (image, target) = decode_census(data)?;
    Some(take_census(&image, &target))
}

const FREE_THREADED: u8 = 1;
const INTERPRETERS_HEAD: u8 = 2;
const THREADS_HEAD: u8 = 4;
const FRAMES: u8 = 8;

fn decode_census(data: &[u8]) -> Option<(HeapImage, CensusTarget)> {
    let mut fields = Fields { data };
    let version = version(minor_from(fields.u8()));
    let flags = fields.u8();
    let runtime = fields.u64();
    let runtime_size = fields.u64();
    let interpreters_head = fields.u64();
    let threads_head = fields.u64();
    let static_types = (0..fields.u16())
        .map(|_| {
            let len = usize::from(fields.u8());
            let name = String::from_utf8_lossy(fields.take(len)).into_owned();
            (name, fields.u64())
        })
        .collect();
    let target = CensusTarget {
        version,
        free_threaded: flags & FREE_THREADED != 0,
        runtime,
        runtime_size,
        interpreters_head_offset: (flags & INTERPRETERS_HEAD != 0).then_some(interpreters_head),
        static_types,
        threads_head_offset: (flags & THREADS_HEAD != 0).then_some(threads_head),
        frames: (flags & FRAMES != 0).then(|| offsets(version)).flatten(),
    };
    let mut regions = Vec::new();
    let mut copied = 0u64;
    while !fields.data.is_empty() {
        let start = fields.u64();
        let size = fields.u32();
        let anonymous = fields.u8() & 1 != 0;
        let chunks = fields.u16();
        if start.checked_add(u64::from(size)).is_none()
            || copied + u64::from(size) > MAX_CENSUS_COPY
        {
            break;
        }
        copied += u64::from(size);
        let mut bytes = Bytes::zeroed(size as usize).ok()?;
        for _ in 0..chunks {
            let offset = fields.u32() as usize;
            let len = fields.u32() as usize;
            let chunk = fields.take(len);
            if let Some(room) = bytes.get_mut(offset..) {
                let len = chunk.len().min(room.len());
                room[..len].copy_from_slice(&chunk[..len]);
            }
        }
        regions.push(Region {
            start,
            bytes,
            anonymous,
        });
    }
    Some((HeapImage::from_regions(regions), target))
}

/// The [`census`] input for a real copy and its target, with only the
/// pages `keep` accepts (page addresses; the others read as zeros). Regions
/// without a page kept are left out.
pub fn census_input(
    image: &HeapImage,
    target: &CensusTarget,
    keep: impl Fn(u64) -> bool,
) -> Vec<u8> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    out.push(target.version.minor.wrapping_sub(8));
    let flags = [
        (target.free_threaded, FREE_THREADED),
        (target.interpreters_head_offset.is_some(), INTERPRETERS_HEAD),
        (target.threads_head_offset.is_some(), THREADS_HEAD),
        (target.frames.is_some(), FRAMES),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |flags, (_, flag)| flags | flag);
    out.push(flags);
    out.extend(target.runtime.to_le_bytes());
    out.extend(target.runtime_size.to_le_bytes());
    out.extend(target.interpreters_head_offset.unwrap_or(0).to_le_bytes());
    out.extend(target.threads_head_offset.unwrap_or(0).to_le_bytes());
    let types: Vec<_> = target
        .static_types
        .iter()
        .filter(|(name, _)| name.len() <= usize::from(u8::MAX))
        .take(usize::from(u16::MAX))
        .collect();
    out.extend((types.len() as u16).to_le_bytes());
    for (name, addr) in types {
        out.push(name.len() as u8);
        out.extend(name.as_bytes());
        out.extend(addr.to_le_bytes());
    }
    for region in image.regions() {
        let Ok(size) = u32::try_from(region.bytes.len()) else {
            continue;
        };
        // Runs of kept pages: (offset, length) in the region.
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        for offset in (0..region.bytes.len()).step_by(PAGE as usize) {
            if !keep((region.start + offset as u64) & !(PAGE - 1)) {
                continue;
            }
            let len = (PAGE as usize).min(region.bytes.len() - offset);
            match chunks.last_mut() {
                Some((start, run)) if *start + *run == offset => *run += len,
                _ => chunks.push((offset, len)),
            }
        }
        if chunks.is_empty() || chunks.len() > usize::from(u16::MAX) {
            continue;
        }
        out.extend(region.start.to_le_bytes());
        out.extend(size.to_le_bytes());
        out.push(u8::from(region.anonymous));
        out.extend((chunks.len() as u16).to_le_bytes());
        for (offset, len) in chunks {
            out.extend((offset as u32).to_le_bytes());
            out.extend((len as u32).to_le_bytes());
            out.extend(&region.bytes[offset..offset + len]);
        }
    }
    out
}

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name in `fuzz/` and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("elf_file", elf_file),
    ("binary_image", binary_image),
    ("usdt_note", usdt_note),
    ("line_tables", line_tables),
    ("symbolize", symbolize),
    ("bytecode", bytecode),
    ("census", census),
];

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// The files of `fuzz/<kind>/<target>/`, if any.
    fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz")
            .join(kind)
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        files
    }

    /// Every input that once crashed a target (kept in fuzz/regressions/)
    /// and every seed runs through its target without a panic.
    #[test]
    fn fuzz_regressions_and_seeds_run_clean() {
        let mut ran = 0;
        for (target, run) in TARGETS {
            for kind in ["regressions", "seeds"] {
                for path in inputs(kind, target) {
                    let data = std::fs::read(&path).unwrap();
                    let outcome = std::panic::catch_unwind(|| run(&data));
                    assert!(outcome.is_ok(), "{target} panics on {}", path.display());
                    ran += 1;
                }
            }
        }
        assert!(ran > 0, "no fuzz inputs found under fuzz/");
    }

    /// The cut-down ELF seeds still read as the interpreters they were cut
    /// from: the cut keeps what the analysis reads.
    #[test]
    fn elf_seeds_are_interpreters() {
        let mut interpreters = 0;
        for path in inputs("seeds", "elf_file") {
            let data = std::fs::read(&path).unwrap();
            match elf::analyze_bytes(&data, "python3") {
                Ok(found) => {
                    assert!(found.stubs.malloc.is_some(), "{}", path.display());
                    interpreters += 1;
                }
                Err(e) => eprintln!("{}: {e:#}", path.display()),
            }
        }
        assert!(interpreters > 0, "no ELF seed reads as an interpreter");
    }

    /// The census seeds give a census, not a refusal.
    #[test]
    fn census_seeds_are_heaps() {
        for path in inputs("seeds", "census") {
            let data = std::fs::read(&path).unwrap();
            let census = census_of(&data).expect("decodes");
            let census = census.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(census.objects > 1000, "{}: {census:?}", path.display());
        }
    }

    /// Writes census seeds (fuzz/seeds/census/) from live interpreters:
    /// copies a small heap as the agent does, takes the census with every
    /// page of the copy protected, and keeps only the pages it read (each
    /// fault unprotects and records one). The seed must give the same
    /// census as the whole copy. Run as root:
    /// `cargo test -p pymem-agent --lib write_census_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/seeds/census/; run by hand"]
    fn write_census_seeds() {
        use std::{
            collections::HashSet,
            io::{BufRead as _, BufReader},
            process::{Command, Stdio},
            sync::atomic::{AtomicUsize, Ordering},
        };

        use crate::{cpython::heap::capture, discover::Discoverer};

        const PAGE: usize = 4096;
        const MAX_TOUCHED: usize = 1 << 16;
        static TOUCHED: [AtomicUsize; MAX_TOUCHED] = [const { AtomicUsize::new(0) }; MAX_TOUCHED];
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        const WORKLOAD: &str = r#"
import sys
class Node:
    def __init__(self, i):
        self.i = i
        self.name = 'node-%d' % i
NODES = [Node(i) for i in range(300)]
TABLE = {('k', i): [i, float(i), b'x' * (i % 40), frozenset([i])] for i in range(300)}
print('ready', flush=True)
sys.stdin.read()
"#;

        extern "C" fn on_fault(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
            // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
            let page = unsafe { (*info).si_addr() } as usize & !(PAGE - 1);
            // SAFETY: unprotects a page of the copy; async-signal-safe.
            let unprotected = unsafe { libc::mprotect(page as *mut _, PAGE, libc::PROT_READ) } == 0;
            let index = COUNT.fetch_add(1, Ordering::SeqCst);
            if !unprotected || index >= MAX_TOUCHED {
                // SAFETY: plain syscall: not a page of the copy, fail as the fault would.
                unsafe { libc::_exit(70) };
            }
            TOUCHED[index].store(page, Ordering::SeqCst);
        }

        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/census");
        std::fs::create_dir_all(&out).unwrap();
        let pythons: Vec<PathBuf> = ["3.8", "3.12", "3.13"]
            .iter()
            .filter_map(|minor| test_interpreters::pyenv(minor))
            .collect();
        for python in pythons {
            let mut child = Command::new(&python)
                .args(["-S", "-c", WORKLOAD])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let pid = child.id();
            let Ok(process) = Discoverer::default().inspect(pid) else {
                panic!("{} is not found as Python", python.display());
            };
            let target = CensusTarget::for_process(pid, &process.binary).unwrap();
            let image = capture(pid, 8 << 30).unwrap();
            drop(child.stdin.take());
            let _ = child.wait();
            let whole = take_census(&image, &target);
            // SAFETY: the handler only touches atomics and makes syscalls.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_fault as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                assert_eq!(
                    libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()),
                    0
                );
            }
            COUNT.store(0, Ordering::SeqCst);
            let protect = |protection| {
                for region in image.regions() {
                    let (at, len) = (region.bytes.as_ptr() as *mut _, region.bytes.len());
                    // SAFETY: the region's own anonymous, page-aligned mapping.
                    assert_eq!(unsafe { libc::mprotect(at, len, protection) }, 0);
                }
            };
            protect(libc::PROT_NONE);
            let traced = take_census(&image, &target);
            protect(libc::PROT_READ);
            // SAFETY: restores the default action.
            unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
            assert_eq!(
                whole,
                traced,
                "{}: the traced census differs",
                python.display()
            );
            let touched: HashSet<u64> = TOUCHED[..COUNT.load(Ordering::SeqCst)]
                .iter()
                .map(|page| page.load(Ordering::SeqCst) as u64)
                .filter_map(|host| {
                    image.regions().iter().find_map(|r| {
                        let base = r.bytes.as_ptr() as u64;
                        (host >= base && host < base + r.bytes.len() as u64)
                            .then(|| r.start + (host - base))
                    })
                })
                .collect();
            let seed = census_input(&image, &target, |page| touched.contains(&page));
            let name = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
                (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            std::fs::write(out.join(format!("{name:016x}")), &seed).unwrap();
            let replayed = census_of(&seed).expect("decodes");
            eprintln!(
                "{}: {} of {} MiB read, seed of {} KiB; census {:?} objects, seed's {:?}",
                python.display(),
                (touched.len() * PAGE) >> 20,
                image.copied_bytes() >> 20,
                seed.len() >> 10,
                whole.as_ref().map(|c| c.objects),
                replayed.as_ref().map(|c| c.objects),
            );
            assert_eq!(
                replayed,
                whole,
                "{}: the seed's census differs",
                python.display()
            );
        }
    }
}
