//! The copy of a process's memory the census reads: every private mapping
//! that can hold objects or the strings naming their types, copied in bulk.
use anyhow::{Context as _, Result, bail};
use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process};

use crate::cpython::memory::ProcessMemory;

/// A copied mapping's bytes, in an anonymous mapping of the agent's own:
/// dropping it hands the memory back to the system at once (a freed heap
/// buffer of this size would stay in the allocator's per-thread arena, and
/// an agent that censused fifty processes would keep fifty copies' worth).
pub struct Bytes {
    map: memmap2::MmapMut,
    len: usize,
}

impl Bytes {
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        Ok(Self {
            map: memmap2::MmapMut::map_anon(len.max(1))?,
            len,
        })
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl std::ops::DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

impl From<&[u8]> for Bytes {
    fn from(data: &[u8]) -> Self {
        let mut bytes = Self::zeroed(data.len()).expect("an anonymous mapping");
        bytes.copy_from_slice(data);
        bytes
    }
}

impl Clone for Bytes {
    fn clone(&self) -> Self {
        Self::from(&self[..])
    }
}

/// One copied mapping.
#[derive(Clone)]
pub struct Region {
    pub start: u64,
    pub bytes: Bytes,
    /// Anonymous memory (the heaps); file-backed regions hold the static
    /// objects and read-only strings of the binaries.
    pub anonymous: bool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// A process's memory as copied at one instant: regions sorted by address.
#[derive(Default, Clone)]
pub struct HeapImage {
    regions: Vec<Region>,
}

impl HeapImage {
    /// From regions in any order; overlapping ones are dropped.
    pub fn from_regions(mut regions: Vec<Region>) -> Self {
        regions.sort_by_key(|r| r.start);
        let mut kept: Vec<Region> = Vec::with_capacity(regions.len());
        for region in regions {
            if kept.last().is_some_and(|last| last.end() > region.start) {
                continue;
            }
            kept.push(region);
        }
        Self { regions: kept }
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn copied_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes.len() as u64).sum()
    }

    /// The region holding `addr`.
    pub fn region(&self, addr: u64) -> Option<&Region> {
        let index = self.regions.partition_point(|r| r.start <= addr);
        let region = self.regions.get(index.checked_sub(1)?)?;
        (addr < region.end()).then_some(region)
    }

    /// The anonymous regions, as (start, end).
    #[cfg(test)]
    pub(crate) fn anonymous_ranges(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .filter(|r| r.anonymous)
            .map(|r| (r.start, r.end()))
            .collect()
    }

    /// Overwrites a word of the copy (tests damage real copies with it).
    #[cfg(test)]
    pub(crate) fn write_u64(&mut self, addr: u64, value: u64) {
        let index = self.regions.partition_point(|r| r.start <= addr) - 1;
        let region = &mut self.regions[index];
        let at = (addr - region.start) as usize;
        region.bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.region(addr).is_some()
    }

    /// Whether `addr` is in anonymous memory (a heap, not a binary's data).
    pub fn is_anonymous(&self, addr: u64) -> bool {
        self.region(addr).is_some_and(|r| r.anonymous)
    }

    /// `len` bytes at `addr`, all inside one region.
    pub fn bytes(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let region = self.region(addr)?;
        let start = (addr - region.start) as usize;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        region.bytes.get(start..end)
    }

    pub fn u64(&self, addr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(addr, 8)?.try_into().ok()?))
    }

    pub fn i64(&self, addr: u64) -> Option<i64> {
        self.u64(addr).map(|v| v as i64)
    }

    pub fn u32(&self, addr: u64) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(addr, 4)?.try_into().ok()?))
    }

    pub fn i32(&self, addr: u64) -> Option<i32> {
        self.u32(addr).map(|v| v as i32)
    }

    pub fn u8(&self, addr: u64) -> Option<u8> {
        self.bytes(addr, 1).map(|b| b[0])
    }

    /// The NUL-terminated printable string at `addr`, NUL within `max`.
    pub fn c_string(&self, addr: u64, max: usize) -> Option<&str> {
        let region = self.region(addr)?;
        let start = (addr - region.start) as usize;
        let rest = &region.bytes[start..];
        let rest = &rest[..rest.len().min(max)];
        let end = rest.iter().position(|&b| b == 0)?;
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        (!text.is_empty() && text.chars().all(|c| !c.is_control())).then_some(text)
    }
}

/// Whether a mapping is copied: private and readable, not executable code
/// nor kernel pages; read-only file mappings are kept for the type names
/// in `.rodata`.
fn wanted(perms: MMPermissions, path: &MMapPath) -> bool {
    if !perms.contains(MMPermissions::READ)
        || !perms.contains(MMPermissions::PRIVATE)
        || perms.contains(MMPermissions::EXECUTE)
    {
        return false;
    }
    match path {
        MMapPath::Vdso | MMapPath::Vvar | MMapPath::Vsyscall => false,
        MMapPath::Path(p) => !p.starts_with("/dev/"),
        _ => true,
    }
}

/// Fails unless `pid`'s copy would fit in `max_bytes`: read from its maps
/// alone, so that a heap too big is refused before its process is paused.
pub fn check_size(pid: u32, max_bytes: u64) -> Result<()> {
    check_copy_size(pid, &copied_maps(pid)?, max_bytes)
}

/// The mappings a copy of `pid` takes: private, readable, not code.
fn copied_maps(pid: u32) -> Result<Vec<MemoryMap>> {
    let maps = Process::new(pid as i32)
        .and_then(|p| p.maps())
        .with_context(|| format!("reading maps of {pid}"))?;
    Ok(maps
        .into_iter()
        .filter(|m| wanted(m.perms, &m.pathname))
        .collect())
}

fn check_copy_size(pid: u32, maps: &[MemoryMap], max_bytes: u64) -> Result<()> {
    let total: u64 = maps.iter().map(|m| m.address.1 - m.address.0).sum();
    if total > max_bytes {
        bail!(
            "process {pid} has {} of private memory to copy, above the limit of {}",
            crate::format::bytes(total),
            crate::format::bytes(max_bytes)
        );
    }
    Ok(())
}

/// Copies every private readable non-code mapping of `pid` (anonymous:
/// pymalloc arenas, libc heaps; file-backed: the binaries' .data/.bss with
/// static types and `_PyRuntime`, and their read-only strings; the main
/// thread's stack), at most
/// `max_bytes` in all. Call while the target is paused.
pub fn capture(pid: u32, max_bytes: u64) -> Result<HeapImage> {
    let chosen = copied_maps(pid)?;
    check_copy_size(pid, &chosen, max_bytes)?;
    let memory = ProcessMemory::open(pid).with_context(|| format!("opening memory of {pid}"))?;
    let mut regions = Vec::with_capacity(chosen.len());
    for map in chosen {
        let (start, end) = map.address;
        let mut bytes = Bytes::zeroed((end - start) as usize)
            .with_context(|| format!("mapping {} bytes for the copy", end - start))?;
        if memory.read_into(start, &mut bytes) == 0 {
            continue;
        }
        // The main thread's stack holds no objects, but 3.11's thread
        // state points into it (`cframe` is a local of the eval loop): read
        // like the binaries' data, never taken for heap.
        regions.push(Region {
            start,
            bytes,
            anonymous: !matches!(map.pathname, MMapPath::Path(_) | MMapPath::Stack),
        });
    }
    Ok(HeapImage::from_regions(regions))
}
