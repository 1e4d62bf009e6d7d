//! The census proper: every live object in a [`HeapImage`] typed and sized,
//! from the GC's generation lists, the pymalloc pools and references to
//! objects outside pymalloc. Every value read from the copy is untrusted:
//! reads are bounded, loops capped, and a layout that does not validate is
//! refused rather than guessed.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{CensusError, CensusTarget, HeapCensus, HeapImage, TypeStats};

mod holders;
mod writers;

const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
const TPFLAGS_MANAGED_WEAKREF: u64 = 1 << 3;
const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
const TPFLAGS_HEAPTYPE: u64 = 1 << 9;
const TPFLAGS_READY: u64 = 1 << 12;
const TPFLAGS_HAVE_GC: u64 = 1 << 14;
const TPFLAGS_LONG_SUBCLASS: u64 = 1 << 24;
const TPFLAGS_LIST_SUBCLASS: u64 = 1 << 25;
const TPFLAGS_TUPLE_SUBCLASS: u64 = 1 << 26;
const TPFLAGS_DICT_SUBCLASS: u64 = 1 << 29;
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;

/// `PyTypeObject` fields, stable on 3.8–3.14.
const TP_NAME: u64 = 24;
const TP_BASICSIZE: u64 = 32;
const TP_ITEMSIZE: u64 = 40;
const TP_DICT: u64 = 264;
const TP_FLAGS: u64 = 168;
const GC_HEAD: u64 = 16;
/// Flag bits of `_gc_next` (unreachable / old space) and `_gc_prev`
/// (finalized, collecting).
const NEXT_MASK: u64 = !1;
const PREV_MASK: u64 = !3;
const POOL_HEADER: u64 = 48;
/// Offsets a block's object may start at: plain, after the GC head, after
/// GC head and pre-header.
const OBJECT_OFFSETS: [u64; 3] = [0, 16, 32];
/// Bound on one container's items followed, and on one name's length.
const MAX_ITEMS: u64 = 1 << 24;
const MAX_NAME: usize = 512;
/// Items of a variable-size object of another type than tuple, bytes, int:
/// more than this is a field that is not `ob_size`.
const MAX_OTHER_ITEMS: u64 = 1 << 20;
/// Reference counts above this are pointers or hashes, not counts (the
/// immortal counts of 3.12+ are below 2^32).
const MAX_REFCNT: u64 = 1 << 32;
/// Distance from an interpreter state's start searched for its GC state.
const INTERP_WINDOW: u64 = 16 << 10;

/// What a type is to the census: how its objects are sized and followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    List,
    Tuple,
    Dict,
    Set,
    /// `numpy.ndarray`: its data buffer is part of its size.
    NdArray,
    Other,
}

#[derive(Clone, Debug)]
struct TypeInfo {
    basicsize: u64,
    itemsize: u64,
    flags: u64,
    kind: Kind,
    /// GC head and pre-header before the object: where it sits in its
    /// allocation, and what `sys.getsizeof` adds.
    prefix: u64,
}

/// Layout facts of one version, each checked against the copy before use.
struct Layout {
    minor: u8,
    pool_size: u64,
    arena_size: u64,
    ascii_header: u64,
    compact_header: u64,
}

/// The static types every census needs, validated by name and size.
struct Core {
    type_type: u64,
    heap_type_size: u64,
    str_type: u64,
    tuple_items: u64,
    set_types: [u64; 2],
}

/// (symbol, Python name, basicsize, itemsize) for one minor version.
fn core_expectations(minor: u8) -> Vec<(&'static str, &'static str, u64, u64)> {
    let unicode = if minor >= 12 { 64 } else { 80 };
    let tuple = if minor >= 14 { 32 } else { 24 };
    vec![
        ("PyDict_Type", "dict", 48, 0),
        ("PyList_Type", "list", 40, 0),
        ("PyTuple_Type", "tuple", tuple, 8),
        ("PyUnicode_Type", "str", unicode, 0),
        ("PyLong_Type", "int", 24, 4),
        ("PyBytes_Type", "bytes", 33, 1),
        ("PyFloat_Type", "float", 24, 0),
        ("PySet_Type", "set", 200, 0),
        ("PyFrozenSet_Type", "frozenset", 200, 0),
    ]
}

/// The generation list heads the census would walk (tests damage them).
#[cfg(test)]
pub(super) fn gc_heads(image: &HeapImage, target: &CensusTarget) -> Result<Vec<u64>, CensusError> {
    let layout = layout_for(target)?;
    Census::new(image, target, layout)?.find_gc_heads()
}

fn layout_for(target: &CensusTarget) -> Result<Layout, CensusError> {
    let version = target.version;
    if target.free_threaded {
        return Err(CensusError::Unsupported(format!(
            "{version} is a free-threaded build: its objects live in per-thread mimalloc heaps, not pymalloc pools, which the census does not read"
        )));
    }
    if version.major != 3 || !(8..=14).contains(&version.minor) {
        return Err(CensusError::Unsupported(format!(
            "the census reads CPython 3.8-3.14, not {version}"
        )));
    }
    let minor = version.minor;
    Ok(Layout {
        minor,
        pool_size: if minor >= 10 { 16 << 10 } else { 4 << 10 },
        arena_size: version.arena_size(),
        ascii_header: if minor >= 12 { 40 } else { 48 },
        compact_header: if minor >= 12 { 56 } else { 72 },
    })
}

/// Types every live object in the copy. Pure function of the copy: never
/// reads the live process. `Unsupported` when the build or a layout fails
/// validation (free-threaded builds, unknown versions, type objects or GC
/// state that do not read as expected).
pub fn take_census(image: &HeapImage, target: &CensusTarget) -> Result<HeapCensus, CensusError> {
    let layout = layout_for(target)?;
    let mut census = Census::new(image, target, layout)?;
    census.run()
}

struct Census<'a> {
    image: &'a HeapImage,
    target: &'a CensusTarget,
    layout: Layout,
    core: Core,
    types: HashMap<u64, TypeInfo>,
    rejected: HashSet<u64>,
    /// Every object counted: address → its index in `order` and
    /// `node_type` (the holders' graph numbers its nodes so).
    counted: HashMap<u64, u32>,
    /// Each counted object's type address, in `order`'s order.
    node_type: Vec<u64>,
    order: Vec<u64>,
    valid_pools: HashSet<u64>,
    /// `PyHeapTypeObject.ht_name`, found by shape ([`Self::find_ht_name_offset`]).
    ht_name_offset: Option<u64>,
    /// Counted objects whose size fields claim more memory than they have
    /// ([`Self::find_damaged`]): sized at their base size, no length.
    damaged: HashSet<u64>,
    warnings: Vec<String>,
}

impl<'a> Census<'a> {
    fn new(
        image: &'a HeapImage,
        target: &'a CensusTarget,
        layout: Layout,
    ) -> Result<Self, CensusError> {
        let unsupported = CensusError::Unsupported;
        let mut census = Census {
            image,
            target,
            layout,
            core: Core {
                type_type: 0,
                heap_type_size: 0,
                str_type: 0,
                tuple_items: 0,
                set_types: [0; 2],
            },
            types: HashMap::default(),
            rejected: HashSet::default(),
            counted: HashMap::default(),
            node_type: Vec::new(),
            order: Vec::new(),
            valid_pools: HashSet::default(),
            ht_name_offset: None,
            damaged: HashSet::default(),
            warnings: Vec::new(),
        };
        let symbol = |name: &str| {
            target
                .static_type(name)
                .ok_or_else(|| unsupported(format!("the binary exports no {name}")))
        };
        let type_type = symbol("PyType_Type")?;
        // Types become ready as the interpreter starts: before that the
        // census cannot read this process yet, which says nothing of the
        // build.
        let starting = |name: &str| {
            CensusError::Failed(format!(
                "{name} is not ready yet: the interpreter is still starting"
            ))
        };
        if census.unready(type_type) {
            return Err(starting("PyType_Type"));
        }
        let raw = census
            .raw_type(type_type)
            .filter(|(name, _)| name == "type")
            .ok_or_else(|| unsupported("PyType_Type does not read as the type 'type'".into()))?;
        if raw.1.basicsize < 800 || census.image.u64(type_type.wrapping_add(8)) != Some(type_type) {
            return Err(unsupported(format!(
                "PyType_Type has an implausible layout (basicsize {})",
                raw.1.basicsize
            )));
        }
        census.core.type_type = type_type;
        census.core.heap_type_size = raw.1.basicsize;
        census.types.insert(type_type, raw.1);
        for (symbol_name, name, basicsize, itemsize) in core_expectations(census.layout.minor) {
            let addr = symbol(symbol_name)?;
            let info = census.raw_type(addr);
            match info {
                Some((found, info))
                    if found == name
                        && info.basicsize == basicsize
                        && info.itemsize == itemsize => {}
                Some((found, info)) => {
                    return Err(unsupported(format!(
                        "{symbol_name} reads as '{found}' of {} + n*{} bytes, expected '{name}' of {basicsize} + n*{itemsize} for {}",
                        info.basicsize, info.itemsize, census.target.version
                    )));
                }
                None if census.unready(addr) => return Err(starting(symbol_name)),
                None => {
                    return Err(unsupported(format!(
                        "{symbol_name} does not read as a type object"
                    )));
                }
            }
            match symbol_name {
                "PyUnicode_Type" => census.core.str_type = addr,
                "PyTuple_Type" => census.core.tuple_items = basicsize,
                "PySet_Type" => census.core.set_types[0] = addr,
                "PyFrozenSet_Type" => census.core.set_types[1] = addr,
                _ => {}
            }
        }
        for (_, addr) in &census.target.static_types {
            census.learn_type(*addr);
        }
        Ok(census)
    }

    /// A static type object that `PyType_Ready` has not prepared yet: its
    /// flags readable, the ready bit clear.
    fn unready(&self, addr: u64) -> bool {
        self.image
            .u64(addr.wrapping_add(TP_FLAGS))
            .is_some_and(|flags| flags & TPFLAGS_READY == 0)
    }

    /// A type object's name and sizes, if `addr` reads as one.
    fn raw_type(&self, addr: u64) -> Option<(String, TypeInfo)> {
        let image = self.image;
        image.bytes(addr, TP_FLAGS + 8)?;
        if image.u64(addr.wrapping_add(8))? == 0 {
            return None;
        }
        let name = image
            .c_string(image.u64(addr.wrapping_add(TP_NAME))?, MAX_NAME)?
            .to_string();
        let basicsize = image.i64(addr.wrapping_add(TP_BASICSIZE))?;
        let itemsize = image.i64(addr.wrapping_add(TP_ITEMSIZE))?;
        let flags = image.u64(addr.wrapping_add(TP_FLAGS))?;
        if !(16..=1 << 24).contains(&basicsize)
            || !(0..=1 << 16).contains(&itemsize)
            || flags & TPFLAGS_READY == 0
        {
            return None;
        }
        let (basicsize, itemsize) = (basicsize as u64, itemsize as u64);
        let kind = if addr == self.core.str_type {
            Kind::Str
        } else if flags & TPFLAGS_LONG_SUBCLASS != 0 {
            Kind::Int
        } else if flags & TPFLAGS_LIST_SUBCLASS != 0 {
            Kind::List
        } else if flags & TPFLAGS_TUPLE_SUBCLASS != 0 {
            Kind::Tuple
        } else if flags & TPFLAGS_DICT_SUBCLASS != 0 {
            Kind::Dict
        } else if self.core.set_types.contains(&addr) {
            Kind::Set
        } else if name == "numpy.ndarray" {
            Kind::NdArray
        } else {
            Kind::Other
        };
        let managed = match self.layout.minor {
            ..=10 => 0,
            11 => TPFLAGS_MANAGED_DICT,
            _ => TPFLAGS_MANAGED_DICT | TPFLAGS_MANAGED_WEAKREF,
        };
        let prefix = if flags & TPFLAGS_HAVE_GC != 0 {
            GC_HEAD
        } else {
            0
        } + if flags & managed != 0 { 16 } else { 0 };
        Some((
            name,
            TypeInfo {
                basicsize,
                itemsize,
                flags,
                kind,
                prefix,
            },
        ))
    }

    /// Adds `addr` to the known types if it and its metatypes (up to
    /// `type`) validate.
    fn learn_type(&mut self, addr: u64) -> bool {
        let mut chain = Vec::new();
        let mut at = addr;
        for _ in 0..4 {
            if self.types.contains_key(&at) {
                break;
            }
            if self.rejected.contains(&at) {
                self.rejected.extend(chain.iter().map(|(a, _)| *a));
                self.rejected.insert(addr);
                return false;
            }
            let Some((_, info)) = self.raw_type(at) else {
                self.rejected.extend(chain.iter().map(|(a, _)| *a));
                self.rejected.insert(at);
                return false;
            };
            // Every type above the first is a metatype.
            if !chain.is_empty() && info.flags & TPFLAGS_TYPE_SUBCLASS == 0 {
                self.rejected.insert(addr);
                return false;
            }
            chain.push((at, info));
            at = self.image.u64(at.wrapping_add(8)).unwrap_or(0);
        }
        if !self.types.contains_key(&at) {
            self.rejected.insert(addr);
            return false;
        }
        self.types.extend(chain);
        true
    }

    fn count(&mut self, obj: u64, type_addr: u64) -> bool {
        if self.counted.contains_key(&obj) {
            return false;
        }
        self.counted.insert(obj, self.order.len() as u32);
        self.order.push(obj);
        self.node_type.push(type_addr);
        true
    }

    /// The type of a counted object.
    fn type_of(&self, obj: u64) -> Option<u64> {
        self.counted.get(&obj).map(|&i| self.node_type[i as usize])
    }

    fn run(&mut self) -> Result<HeapCensus, CensusError> {
        let heads = self.find_gc_heads()?;
        let mut result = HeapCensus::default();
        let mut budget = self.image.copied_bytes() / 32 + 16;
        let mut untyped = 0u64;
        for head in heads {
            for obj in self.walk_gc_list(head, &mut budget) {
                let type_addr = self.image.u64(obj.wrapping_add(8)).unwrap_or(0);
                if self.learn_type(type_addr) {
                    if self.count(obj, type_addr) {
                        result.gc_tracked += 1;
                    }
                } else {
                    untyped += 1;
                }
            }
        }
        if untyped > 0 {
            self.warnings.push(format!(
                "{untyped} GC-tracked objects skipped: their type did not validate"
            ));
        }
        self.ht_name_offset = self.find_ht_name_offset();
        self.walk_pools(&mut result);
        self.follow_references();
        self.find_damaged(&mut result);
        self.tally(&mut result);
        result.holders = self.holders();
        result.warnings = std::mem::take(&mut self.warnings);
        Ok(result)
    }

    /// A GC list head at least one of whose neighbours points back at it.
    /// One is enough: a process paused inside `gc_list_append` (the last
    /// node already linked forward to the new one, the head's back link
    /// not yet moved) has a torn head for a few instructions; the walk
    /// then stops at the tear and says so.
    fn is_list_head(&self, head: u64) -> bool {
        let image = self.image;
        let (Some(next), Some(prev)) = (image.u64(head), image.u64(head.wrapping_add(8))) else {
            return false;
        };
        let (next, prev) = (next & NEXT_MASK, prev & PREV_MASK);
        let forward = || image.u64(next.wrapping_add(8)).map(|p| p & PREV_MASK) == Some(head);
        let backward = || image.u64(prev).map(|n| n & NEXT_MASK) == Some(head);
        next != 0 && prev != 0 && (forward() || backward())
    }

    /// The generation heads of a GC state whose first generation is at
    /// `at`: generational (three generations, `generation0` pointing back,
    /// then the permanent one) or 3.14's incremental (young, two old
    /// spaces, permanent), told apart by that shape.
    fn gc_heads_at(&self, at: u64) -> Option<(Vec<u64>, &'static str)> {
        let image = self.image;
        let plausible = |generation: u64, min: i32| {
            let threshold = image.i32(generation.wrapping_add(16))?;
            let count = image.i32(generation.wrapping_add(20))?;
            ((min..=1_000_000).contains(&threshold) && count >= 0).then_some(())
        };
        for i in 0..3 {
            let generation = at.wrapping_add(24 * i);
            if !self.is_list_head(generation) {
                return None;
            }
            plausible(generation, if i == 0 { 1 } else { 0 })?;
        }
        // `generation0` is pointer-aligned even where the generations are
        // not (Debian's 3.13.5 has them at 4 mod 8).
        let generation0 = (at + 72).next_multiple_of(8);
        if image.u64(generation0) == Some(at) && self.is_list_head(generation0 + 8) {
            return Some((vec![at, at + 24, at + 48, generation0 + 8], "generational"));
        }
        if self.is_list_head(at + 72) {
            return Some((vec![at, at + 24, at + 48, at + 72], "incremental"));
        }
        None
    }

    /// Where the version puts the first generation, from the interpreter
    /// state's start (3.9+), or `None` (3.8 keeps it in `_PyRuntime`).
    fn expected_gc_offset(&self) -> Option<u64> {
        let gc_state = match self.layout.minor {
            9 | 10 => 616,
            11 => 648,
            12 => 112,
            13 => 7400,
            14 => 7408,
            _ => return None,
        };
        Some(gc_state + 24)
    }

    /// Candidate addresses of the main interpreter's state: what
    /// `_PyRuntime.interpreters.head` holds (its offset from
    /// `_Py_DebugOffsets`, else each plausible one).
    fn interpreter_candidates(&self) -> Vec<u64> {
        let image = self.image;
        let runtime = self.target.runtime;
        let head_offsets: Vec<u64> = match self.target.interpreters_head_offset {
            Some(offset) => vec![offset],
            None => (24..=64).step_by(8).collect(),
        };
        head_offsets
            .iter()
            .filter_map(|&offset| image.u64(runtime.wrapping_add(offset)))
            .filter(|&p| p != 0 && p % 8 == 0 && image.contains(p))
            .collect()
    }

    fn find_gc_heads(&mut self) -> Result<Vec<u64>, CensusError> {
        let runtime = self.target.runtime;
        let interps = self.interpreter_candidates();
        if let Some(expected) = self.expected_gc_offset() {
            for &interp in &interps {
                if let Some((heads, _)) = self.gc_heads_at(interp + expected) {
                    return Ok(heads);
                }
            }
        }
        let runtime_window = self.target.runtime_size.clamp(4096, 4 << 20);
        let windows = interps
            .iter()
            .map(|&p| (p, INTERP_WINDOW))
            .chain([(runtime, runtime_window)]);
        for (start, len) in windows {
            for at in (start..start.saturating_add(len)).step_by(4) {
                if let Some((heads, shape)) = self.gc_heads_at(at) {
                    if self.expected_gc_offset().is_some() {
                        self.warnings.push(format!(
                            "GC state ({shape}) found at {:#x} from its structure's start, not at the offset expected for {}",
                            at - start,
                            self.target.version
                        ));
                    }
                    return Ok(heads);
                }
            }
        }
        // Not a verdict on the build: an interpreter still starting has no
        // GC state yet, and one paused mid-collection may have none that
        // reads as lists. The next census tries again.
        Err(CensusError::Failed(format!(
            "no GC generation lists found in the interpreter state of this {} build (still starting, or paused mid-collection?)",
            self.target.version
        )))
    }

    /// The objects on one GC list, stopping at a broken link or after
    /// `budget` nodes in all.
    fn walk_gc_list(&mut self, head: u64, budget: &mut u64) -> Vec<u64> {
        let image = self.image;
        let mut found = Vec::new();
        let mut at = head;
        loop {
            let Some(next) = image.u64(at).map(|n| n & NEXT_MASK) else {
                self.warnings
                    .push(format!("GC list at {head:#x} leaves the copy; cut short"));
                break;
            };
            if next == head {
                break;
            }
            // Consistent back links make the walk cycle-safe: a loop that
            // does not return to the head breaks one.
            if image.u64(next.wrapping_add(8)).map(|p| p & PREV_MASK) != Some(at) {
                self.warnings
                    .push(format!("GC list at {head:#x} has a broken link; cut short"));
                break;
            }
            if *budget == 0 {
                self.warnings
                    .push("GC lists longer than the copy allows; cut short".into());
                break;
            }
            *budget -= 1;
            found.push(next + GC_HEAD);
            at = next;
        }
        found
    }

    fn walk_pools(&mut self, result: &mut HeapCensus) {
        let pool = self.layout.pool_size;
        let mut arenas = HashSet::default();
        let mut invalid = 0u64;
        for region in self.image.regions().iter().filter(|r| r.anonymous) {
            let mut at = region.start.div_ceil(pool) * pool;
            while at + pool <= region.end() {
                let offset = (at - region.start) as usize;
                let bytes = &region.bytes[offset..offset + pool as usize];
                at += pool;
                let Some(header) = PoolHeader::parse(bytes, pool) else {
                    continue;
                };
                let Some(live) = header.live_blocks(bytes, at - pool) else {
                    invalid += 1;
                    continue;
                };
                let base = at - pool;
                self.valid_pools.insert(base);
                arenas.insert(header.arena_index);
                result.pool_used_bytes += live.len() as u64 * header.block_size;
                for block in live {
                    if !self.classify_block(base + block, header.block_size) {
                        result.unattributed_bytes += header.block_size;
                    }
                }
            }
        }
        if invalid > 0 {
            self.warnings.push(format!(
                "{invalid} pool headers skipped: their free list or count did not validate"
            ));
        }
        result.arenas = arenas.len() as u64;
        result.arena_bytes = result.arenas * self.layout.arena_size;
    }

    /// Counts the object a live block holds, if its type is known and the
    /// type's flags put the object where it was found.
    fn classify_block(&mut self, block: u64, size: u64) -> bool {
        for offset in OBJECT_OFFSETS.into_iter().filter(|&o| o < size) {
            let Some(type_addr) = self.image.u64(block.wrapping_add(offset + 8)) else {
                return false;
            };
            if !self.types.contains_key(&type_addr) && self.may_be_type(type_addr) {
                self.learn_type(type_addr);
            }
            let Some(info) = self.types.get(&type_addr) else {
                continue;
            };
            let obj = block + offset;
            if info.prefix == offset
                && offset + self.min_size(info) <= size
                && self.plausible_object(obj, info, size)
            {
                self.count(obj, type_addr);
                return true;
            }
        }
        false
    }

    /// Whether a type pointer of an untracked object is worth validating:
    /// a class (heap types are GC-tracked, so already counted as objects
    /// of a metatype) or static data of a module (an extension's static
    /// types, such as `numpy.ndarray`, whose objects are never on a GC list).
    fn may_be_type(&self, addr: u64) -> bool {
        if addr == 0 || !addr.is_multiple_of(8) || self.rejected.contains(&addr) {
            return false;
        }
        match self.type_of(addr) {
            Some(metatype) => self
                .types
                .get(&metatype)
                .is_some_and(|t| t.flags & TPFLAGS_TYPE_SUBCLASS != 0),
            None => self.image.contains(addr) && !self.image.is_anonymous(addr),
        }
    }

    /// Whether `obj` of type `info` looks like a live object rather than a
    /// buffer that happens to hold a type pointer (a list of types, a
    /// dict's entries): a reference count, and the object's own bytes fit
    /// in `room` (its block; or the copy, outside pymalloc).
    fn plausible_object(&self, obj: u64, info: &TypeInfo, room: u64) -> bool {
        let Some(refcnt) = self.image.u64(obj) else {
            return false;
        };
        if refcnt == 0 || refcnt > MAX_REFCNT {
            return false;
        }
        let (size, buffers) = self.object_size(obj, info);
        let inline = size - buffers.iter().map(|b| b.1).sum::<u64>().min(size);
        inline <= room
    }

    /// The smallest object of a type: `tp_basicsize`, except for str,
    /// whose compact objects are smaller than `PyUnicodeObject`.
    fn min_size(&self, info: &TypeInfo) -> u64 {
        match info.kind {
            Kind::Str => self.layout.ascii_header + 1,
            _ => info.basicsize,
        }
    }

    fn in_pool(&self, addr: u64) -> bool {
        self.valid_pools
            .contains(&(addr & !(self.layout.pool_size - 1)))
    }

    /// Objects outside pymalloc (over 512 bytes, in libc's heap): only
    /// reachable through references from containers.
    fn follow_references(&mut self) {
        let mut budget: u64 = 1 << 26;
        let mut index = 0;
        let mut refs = Vec::new();
        while index < self.order.len() && budget > 0 {
            let obj = self.order[index];
            index += 1;
            let type_addr = self.node_type[index - 1];
            let Some(info) = self.types.get(&type_addr).cloned() else {
                continue;
            };
            refs.clear();
            self.references(obj, type_addr, &info, &mut refs);
            budget = budget.saturating_sub(refs.len() as u64 + 1);
            for &referent in &refs {
                if referent == 0
                    || referent % 8 != 0
                    || self.counted.contains_key(&referent)
                    || !self.image.is_anonymous(referent)
                    || self.in_pool(referent)
                {
                    continue;
                }
                let Some(referent_type) = self.image.u64(referent.wrapping_add(8)) else {
                    continue;
                };
                if !self.types.contains_key(&referent_type) && self.may_be_type(referent_type) {
                    self.learn_type(referent_type);
                }
                let Some(referent_info) = self.types.get(&referent_type) else {
                    continue;
                };
                let base = referent.wrapping_sub(referent_info.prefix);
                let room = self.image.region(base).map_or(0, |r| r.end() - base);
                if self.plausible_object(referent, referent_info, room) {
                    self.count(referent, referent_type);
                }
            }
        }
        if budget == 0 {
            self.warnings.push(
                "reference walk stopped at its bound; objects outside pymalloc may be missing"
                    .into(),
            );
        }
    }

    /// Marks the counted objects whose sizes cannot be true: their inline
    /// part larger than their block (or the rest of their mapping), or a
    /// buffer that runs past the end of the mapping it starts in. GC-listed
    /// objects are counted without [`Self::plausible_object`]; a process
    /// that damages its own objects (a list claiming 2^40 items) would
    /// otherwise be reported holding terabytes.
    fn find_damaged(&mut self, result: &mut HeapCensus) {
        let mut by_type: HashMap<u64, u64> = HashMap::default();
        let mut damaged = HashSet::default();
        for (&obj, &type_addr) in self.order.iter().zip(&self.node_type) {
            if let Some(info) = self.types.get(&type_addr)
                && self.claims_more_than_it_has(obj, info)
            {
                damaged.insert(obj);
                *by_type.entry(type_addr).or_default() += 1;
            }
        }
        if damaged.is_empty() {
            return;
        }
        result.damaged_objects = damaged.len() as u64;
        self.damaged = damaged;
        let mut types: Vec<String> = by_type
            .iter()
            .map(|(&t, &n)| format!("{} {n}", self.type_name(t, &mut Vec::new())))
            .collect();
        types.sort();
        types.truncate(8);
        self.warnings.push(format!(
            "{} objects claim more memory than they have (sizes damaged, or torn mid-update): counted at their base size, their lengths not given: {}",
            result.damaged_objects,
            types.join(", ")
        ));
    }

    fn claims_more_than_it_has(&self, obj: u64, info: &TypeInfo) -> bool {
        let (size, buffers) = self.object_size(obj, info);
        let inline = size - buffers.iter().map(|b| b.1).sum::<u64>().min(size);
        let start = obj.wrapping_sub(info.prefix);
        let room = self
            .block_size(start)
            .unwrap_or_else(|| self.image.region(start).map_or(0, |r| r.end() - start));
        inline > room
            || buffers.iter().any(|&(addr, len)| {
                len > 0 && self.image.contains(addr) && self.image.bytes(addr, len).is_none()
            })
    }

    /// The objects a container refers to (bounded).
    fn references(&self, obj: u64, type_addr: u64, info: &TypeInfo, out: &mut Vec<u64>) {
        if info.flags & TPFLAGS_MANAGED_DICT != 0 {
            self.managed_values(obj, type_addr, info, out);
        }
        let image = self.image;
        let words = |addr: u64, n: u64, out: &mut Vec<u64>| {
            if n == 0 || n > MAX_ITEMS {
                return;
            }
            if let Some(bytes) = image.bytes(addr, n * 8) {
                out.extend(
                    bytes
                        .chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default())),
                );
            }
        };
        match info.kind {
            Kind::List => {
                let (Some(items), Some(len)) = (
                    image.u64(obj.wrapping_add(24)),
                    image.i64(obj.wrapping_add(16)),
                ) else {
                    return;
                };
                words(items, len.max(0) as u64, out);
            }
            Kind::Tuple => {
                let Some(len) = image.i64(obj.wrapping_add(16)) else {
                    return;
                };
                words(obj + self.core.tuple_items, len.max(0) as u64, out);
            }
            Kind::Dict => {
                for (key, value) in self.dict_entries(obj) {
                    out.push(key);
                    out.push(value);
                }
            }
            Kind::Set => {
                let (Some(mask), Some(table)) = (
                    image.u64(obj.wrapping_add(32)),
                    image.u64(obj.wrapping_add(40)),
                ) else {
                    return;
                };
                let slots = mask.saturating_add(1);
                if slots > MAX_ITEMS {
                    return;
                }
                if let Some(bytes) = image.bytes(table, slots * 16) {
                    out.extend(
                        bytes
                            .chunks_exact(16)
                            .map(|e| u64::from_le_bytes(e[..8].try_into().unwrap_or_default())),
                    );
                }
            }
            _ => {}
        }
    }

    /// The attribute values an instance keeps without a dict object: 3.11's
    /// values pointer before the GC head, 3.12's tagged dict-or-values
    /// pointer, 3.13's inline values after the object.
    fn managed_values(&self, obj: u64, type_addr: u64, info: &TypeInfo, out: &mut Vec<u64>) {
        let image = self.image;
        let cached_keys_len = || {
            let offset = self.ht_name_offset? + 24;
            let keys = image.u64(type_addr.wrapping_add(offset))?;
            image.u64(keys.wrapping_add(24)).filter(|&n| n <= 1 << 12)
        };
        let (values, len) = match self.layout.minor {
            ..=10 => return,
            11 => {
                let Some(values) = image.u64(obj.wrapping_sub(32)) else {
                    return;
                };
                (values, cached_keys_len())
            }
            12 => {
                let Some(tagged) = image.u64(obj.wrapping_sub(24)) else {
                    return;
                };
                if tagged & 1 == 0 {
                    return;
                }
                // Stored as `values - 1` (odd): the tag.
                (tagged.wrapping_add(1), cached_keys_len())
            }
            _ => {
                if info.flags & TPFLAGS_INLINE_VALUES == 0 {
                    return;
                }
                let values = obj + info.basicsize;
                let valid = image.u8(values.wrapping_add(3)) == Some(1);
                let capacity = image.u8(values).map(u64::from);
                if !valid {
                    return;
                }
                (values + 8, capacity)
            }
        };
        let Some(len) = len.filter(|&n| n > 0) else {
            return;
        };
        if let Some(bytes) = image.bytes(values, len * 8) {
            out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default())),
            );
        }
    }

    /// A dict's keys table: (entries address, entry count, entry size, key
    /// offset, value offset).
    fn dict_table(&self, keys: u64) -> Option<(u64, u64, u64, u64, u64)> {
        let image = self.image;
        if self.layout.minor <= 10 {
            let size = image.u64(keys.wrapping_add(8))?;
            let nentries = image.u64(keys.wrapping_add(32))?;
            if !size.is_power_of_two() || size > MAX_ITEMS || nentries > size {
                return None;
            }
            let index_bytes = index_width(size) * size;
            return Some((keys.wrapping_add(40 + index_bytes), nentries, 24, 8, 16));
        }
        let log2_size = image.u8(keys.wrapping_add(8))? as u64;
        let log2_index = image.u8(keys.wrapping_add(9))? as u64;
        let kind = image.u8(keys.wrapping_add(10))?;
        let nentries = image.u64(keys.wrapping_add(24))?;
        if log2_size > 30 || log2_index > 33 || kind > 2 || nentries > (1 << log2_size) {
            return None;
        }
        let (entry, key, value) = if kind == 0 { (24, 8, 16) } else { (16, 0, 8) };
        Some((
            keys.wrapping_add(32 + (1 << log2_index)),
            nentries,
            entry,
            key,
            value,
        ))
    }

    /// (key, value) of a dict's entries; split dicts take values from
    /// their values array.
    fn dict_entries(&self, dict: u64) -> Vec<(u64, u64)> {
        let image = self.image;
        let (Some(keys), Some(values)) = (
            image.u64(dict.wrapping_add(32)),
            image.u64(dict.wrapping_add(40)),
        ) else {
            return Vec::new();
        };
        let Some((entries, n, entry, key_at, value_at)) = self.dict_table(keys) else {
            return Vec::new();
        };
        let Some(table) = image.bytes(entries, n * entry) else {
            return Vec::new();
        };
        let values_base = if self.layout.minor >= 13 {
            values.wrapping_add(8)
        } else {
            values
        };
        let split_values = if values != 0 {
            image.bytes(values_base, n * 8)
        } else {
            None
        };
        let word = |bytes: &[u8], at: u64| {
            bytes
                .get(at as usize..at as usize + 8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .unwrap_or(0)
        };
        (0..n)
            .filter_map(|i| {
                let key = word(table, i * entry + key_at);
                let value = match split_values {
                    Some(v) => word(v, i * 8),
                    None if values != 0 => 0,
                    None => word(table, i * entry + value_at),
                };
                (key != 0).then_some((key, value))
            })
            .collect()
    }

    /// The bytes of a dict's keys table, `sys.getsizeof`'s way.
    fn dict_keys_size(&self, keys: u64) -> Option<u64> {
        let image = self.image;
        if self.layout.minor <= 10 {
            let size = image.u64(keys.wrapping_add(8))?;
            if !size.is_power_of_two() || size > MAX_ITEMS {
                return None;
            }
            return Some(40 + index_width(size) * size + 24 * usable_fraction(size));
        }
        let log2_size = image.u8(keys.wrapping_add(8))? as u64;
        let log2_index = image.u8(keys.wrapping_add(9))? as u64;
        let kind = image.u8(keys.wrapping_add(10))?;
        if log2_size > 30 || log2_index > 33 || kind > 2 {
            return None;
        }
        let entry = if kind == 0 { 24 } else { 16 };
        Some(32 + (1 << log2_index) + usable_fraction(1 << log2_size) * entry)
    }

    /// `sys.getsizeof(obj)`, and the part of it in separate buffers with
    /// their addresses (list items, dict keys, set tables).
    fn object_size(&self, obj: u64, info: &TypeInfo) -> (u64, Vec<(u64, u64)>) {
        let image = self.image;
        let bounded = |n: i64| n.unsigned_abs().min(MAX_ITEMS * 64);
        let base = info.basicsize + info.prefix;
        if self.damaged.contains(&obj) {
            return (base, Vec::new());
        }
        match info.kind {
            Kind::Str => self.str_size(obj).unwrap_or((base, Vec::new())),
            Kind::Int => {
                let digits = if self.layout.minor >= 12 {
                    image
                        .u64(obj.wrapping_add(16))
                        .map_or(0, |tag| (tag >> 3).min(MAX_ITEMS))
                } else {
                    image.i64(obj.wrapping_add(16)).map_or(0, bounded)
                };
                let digits = if self.layout.minor >= 11 {
                    digits.max(1)
                } else {
                    digits
                };
                (24 + digits * 4 + info.prefix, Vec::new())
            }
            Kind::List => {
                let allocated = image.i64(obj.wrapping_add(32)).map_or(0, bounded);
                let items = image.u64(obj.wrapping_add(24)).unwrap_or(0);
                (base + allocated * 8, vec![(items, allocated * 8)])
            }
            Kind::Set => {
                let table = image.u64(obj.wrapping_add(40)).unwrap_or(0);
                if table == obj + 64 {
                    return (base, Vec::new());
                }
                let slots = image
                    .u64(obj.wrapping_add(32))
                    .map_or(0, |m| m.saturating_add(1).min(MAX_ITEMS));
                (base + slots * 16, vec![(table, slots * 16)])
            }
            Kind::Dict => {
                let (Some(keys), Some(values)) = (
                    image.u64(obj.wrapping_add(32)),
                    image.u64(obj.wrapping_add(40)),
                ) else {
                    return (base, Vec::new());
                };
                let mut size = base;
                let mut buffers = Vec::new();
                if values != 0 {
                    let usable = if self.layout.minor <= 10 {
                        image
                            .u64(keys.wrapping_add(8))
                            .map_or(0, |s| usable_fraction(s.min(MAX_ITEMS)))
                    } else {
                        let usable = image.u64(keys.wrapping_add(16)).unwrap_or(0);
                        let n = image.u64(keys.wrapping_add(24)).unwrap_or(0);
                        usable.saturating_add(n).min(MAX_ITEMS)
                    };
                    size += usable * 8;
                    buffers.push((values, usable * 8));
                }
                if image.u64(keys) == Some(1)
                    && let Some(keys_size) = self.dict_keys_size(keys)
                {
                    size += keys_size;
                    buffers.push((keys, keys_size));
                }
                (size, buffers)
            }
            Kind::Tuple => {
                let items = image.i64(obj.wrapping_add(16)).map_or(0, bounded) * info.itemsize;
                (base + items, Vec::new())
            }
            Kind::NdArray => match self.ndarray_data(obj) {
                // numpy's `__sizeof__` adds the data an array owns.
                Some((data, bytes)) => (base + bytes, vec![(data, bytes)]),
                None => (base, Vec::new()),
            },
            Kind::Other => {
                // Types with an item size but no `ob_size` (3.11+ generators
                // size themselves from their code object) read garbage
                // there: an implausible count adds nothing.
                let count = image
                    .i64(obj.wrapping_add(16))
                    .map_or(0, |n| n.unsigned_abs());
                let items = if info.itemsize > 0 && count <= MAX_OTHER_ITEMS {
                    count * info.itemsize
                } else {
                    0
                };
                (base + items, Vec::new())
            }
        }
    }

    /// The data buffer an array owns (`NPY_ARRAY_OWNDATA`) and its bytes:
    /// the product of its dimensions times its item size, the smallest
    /// stride of a contiguous array (the fields numpy's ABI keeps fixed:
    /// data, nd, dimensions, strides, base, descr, flags).
    fn ndarray_data(&self, obj: u64) -> Option<(u64, u64)> {
        const OWNDATA: i32 = 0x4;
        let image = self.image;
        let data = image.u64(obj.wrapping_add(16))?;
        let nd = image.i32(obj.wrapping_add(24))?;
        let flags = image.i32(obj.wrapping_add(64))?;
        if flags & OWNDATA == 0 || data == 0 || !(1..=32).contains(&nd) {
            return None;
        }
        let nd = nd as u64;
        let dims = image.bytes(image.u64(obj.wrapping_add(32))?, nd * 8)?;
        let strides = image.bytes(image.u64(obj.wrapping_add(40))?, nd * 8)?;
        let word = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default());
        let mut elements: u64 = 1;
        for dim in dims.chunks_exact(8).map(word) {
            elements = elements.checked_mul(u64::try_from(dim).ok()?)?;
        }
        let item = strides
            .chunks_exact(8)
            .map(word)
            .map(i64::unsigned_abs)
            .filter(|&s| s > 0)
            .min()
            .unwrap_or(0)
            .min(64);
        let bytes = elements.checked_mul(item)?;
        (bytes < 1 << 40).then_some((data, bytes))
    }

    /// A str's `sys.getsizeof` and its separate buffers (legacy data, UTF-8).
    fn str_size(&self, obj: u64) -> Option<(u64, Vec<(u64, u64)>)> {
        let image = self.image;
        let length = image.i64(obj.wrapping_add(16))?;
        if !(0..1 << 40).contains(&length) {
            return None;
        }
        let length = length as u64;
        let state = image.u32(obj.wrapping_add(32))?;
        let kind = ((state >> 2) & 7) as u64;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        if !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        let (ascii_header, compact_header) = (self.layout.ascii_header, self.layout.compact_header);
        if compact && ascii {
            return Some((ascii_header + length + 1, Vec::new()));
        }
        let utf8_length = image.u64(obj.wrapping_add(ascii_header))?;
        let utf8 = image.u64(obj.wrapping_add(ascii_header + 8))?;
        let mut buffers = Vec::new();
        let (mut size, data) = if compact {
            (compact_header + (length + 1) * kind, obj + compact_header)
        } else {
            let data = image.u64(obj.wrapping_add(compact_header))?;
            let payload = if data != 0 { (length + 1) * kind } else { 0 };
            buffers.push((data, payload));
            (compact_header + 8 + payload, data)
        };
        if utf8 != 0 && utf8 != data && utf8_length < 1 << 40 {
            size += utf8_length + 1;
            buffers.push((utf8, utf8_length + 1));
        }
        Some((size, buffers))
    }

    /// The text of a compact ASCII str object.
    fn ascii_text(&self, obj: u64) -> Option<&'a str> {
        let image = self.image;
        if image.u64(obj.wrapping_add(8))? != self.core.str_type {
            return None;
        }
        let length = image.u64(obj.wrapping_add(16))?;
        let state = image.u32(obj.wrapping_add(32))?;
        if length > MAX_NAME as u64 || state & (1 << 5) == 0 || state & (1 << 6) == 0 {
            return None;
        }
        std::str::from_utf8(image.bytes(obj.wrapping_add(self.layout.ascii_header), length)?).ok()
    }

    /// A class's name as Python shows it, `module.QualName`: `ht_qualname`
    /// (found as the field two after `ht_name`, the str whose text
    /// `tp_name` points at) and `__module__` from the type's dict.
    /// Where `PyHeapTypeObject.ht_name` sits in this build: the offset at
    /// which most classes hold the str whose text their `tp_name` points
    /// at (`type_new` sets `tp_name` so).
    fn find_ht_name_offset(&self) -> Option<u64> {
        let image = self.image;
        let header = self.layout.ascii_header;
        let mut votes: HashMap<u64, u64> = HashMap::default();
        let heap_types = self
            .types
            .iter()
            .filter(|(_, t)| t.flags & TPFLAGS_HEAPTYPE != 0)
            .take(4096);
        for (&type_addr, _) in heap_types {
            let Some(tp_name) = image.u64(type_addr.wrapping_add(TP_NAME)) else {
                continue;
            };
            let found = (400..self.core.heap_type_size.saturating_sub(16))
                .step_by(8)
                .find(|&offset| {
                    image
                        .u64(type_addr.wrapping_add(offset))
                        .is_some_and(|name| {
                            name.wrapping_add(header) == tp_name && self.ascii_text(name).is_some()
                        })
                });
            if let Some(offset) = found {
                *votes.entry(offset).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|&(offset, n)| (n, offset))
            .map(|(offset, _)| offset)
    }

    fn heap_type_name(&self, type_addr: u64) -> Option<String> {
        let image = self.image;
        let ht_name = self.ht_name_offset?;
        self.ascii_text(image.u64(type_addr.wrapping_add(ht_name))?)?;
        let qualname = self.ascii_text(image.u64(type_addr.wrapping_add(ht_name + 16))?)?;
        let dict = image.u64(type_addr.wrapping_add(TP_DICT))?;
        let module = self
            .dict_entries(dict)
            .into_iter()
            .find(|&(key, _)| self.ascii_text(key) == Some("__module__"))
            .and_then(|(_, value)| self.ascii_text(value));
        Some(match module {
            Some("builtins") => qualname.to_string(),
            Some(module) => format!("{module}.{qualname}"),
            None => qualname.to_string(),
        })
    }

    fn type_name(&self, type_addr: u64, fallbacks: &mut Vec<String>) -> String {
        let static_name = self
            .image
            .u64(type_addr + TP_NAME)
            .and_then(|p| self.image.c_string(p, MAX_NAME))
            .unwrap_or("?")
            .to_string();
        let heap = self
            .types
            .get(&type_addr)
            .is_some_and(|t| t.flags & TPFLAGS_HEAPTYPE != 0);
        if !heap {
            return static_name;
        }
        self.heap_type_name(type_addr).unwrap_or_else(|| {
            fallbacks.push(static_name.clone());
            static_name
        })
    }

    fn tally(&mut self, result: &mut HeapCensus) {
        let mut by_type: HashMap<u64, (u64, u64)> = HashMap::default();
        let mut outside = 0u64;
        for (&obj, &type_addr) in self.order.iter().zip(&self.node_type) {
            let Some(info) = self.types.get(&type_addr) else {
                continue;
            };
            let (size, buffers) = self.object_size(obj, info);
            let entry = by_type.entry(type_addr).or_default();
            entry.0 += 1;
            entry.1 += size;
            if self.image.is_anonymous(obj) && !self.in_pool(obj) {
                outside += size - buffers.iter().map(|b| b.1).sum::<u64>().min(size);
            }
            for (addr, len) in buffers {
                if addr != 0 && self.image.is_anonymous(addr) && !self.in_pool(addr) {
                    outside += len;
                }
            }
        }
        let mut fallbacks = Vec::new();
        let mut named: HashMap<String, TypeStats> = HashMap::default();
        for (type_addr, (count, bytes)) in by_type {
            let name = self.type_name(type_addr, &mut fallbacks);
            let stats = named.entry(name.clone()).or_insert(TypeStats {
                type_name: name,
                count: 0,
                bytes: 0,
            });
            stats.count += count;
            stats.bytes += bytes;
        }
        if !fallbacks.is_empty() {
            fallbacks.sort();
            self.warnings.push(format!(
                "{} classes named by tp_name, their qualified name or module not validating: {}",
                fallbacks.len(),
                fallbacks
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut types: Vec<TypeStats> = named.into_values().collect();
        types.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then_with(|| a.type_name.cmp(&b.type_name))
        });
        result.objects = types.iter().map(|t| t.count).sum();
        result.object_bytes = types.iter().map(|t| t.bytes).sum();
        result.types = types;
        result.outside_pymalloc_bytes = outside;
    }
}

/// Bytes of one dict index entry for a table of `size` slots (3.8–3.10).
fn index_width(size: u64) -> u64 {
    match size {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

fn usable_fraction(size: u64) -> u64 {
    (size << 1) / 3
}

/// A pymalloc pool header that validates.
struct PoolHeader {
    count: u64,
    freeblock: u64,
    arena_index: u32,
    block_size: u64,
    next_offset: u64,
}

impl PoolHeader {
    fn parse(bytes: &[u8], pool: u64) -> Option<Self> {
        let u32_at =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as u64;
        let count = u32_at(0);
        let freeblock = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let arena_index = u32_at(32);
        let size_index = u32_at(36);
        let next_offset = u32_at(40);
        let max_next_offset = u32_at(44);
        if size_index >= 32 || arena_index >= 1 << 24 {
            return None;
        }
        let block_size = (size_index + 1) * 16;
        let capacity = (pool - POOL_HEADER) / block_size;
        let valid = max_next_offset == pool - block_size
            && (POOL_HEADER..=max_next_offset + block_size).contains(&next_offset)
            && (next_offset - POOL_HEADER).is_multiple_of(block_size)
            && count <= capacity;
        valid.then_some(Self {
            count,
            freeblock,
            arena_index: arena_index as u32,
            block_size,
            next_offset,
        })
    }

    /// Offsets of the live blocks: the carved ones minus the free list,
    /// which must be inside the pool, acyclic and leave `count` blocks.
    fn live_blocks(&self, bytes: &[u8], base: u64) -> Option<Vec<u64>> {
        let carved = (self.next_offset - POOL_HEADER) / self.block_size;
        let mut free = vec![false; carved as usize];
        let mut at = self.freeblock;
        let mut freed = 0u64;
        while at != 0 {
            let offset = at.checked_sub(base)?;
            if offset < POOL_HEADER || offset >= self.next_offset {
                return None;
            }
            let index = (offset - POOL_HEADER) / self.block_size;
            if !(offset - POOL_HEADER).is_multiple_of(self.block_size) || free[index as usize] {
                return None;
            }
            free[index as usize] = true;
            freed += 1;
            let link = bytes.get(offset as usize..offset as usize + 8)?;
            at = u64::from_le_bytes(link.try_into().ok()?);
        }
        if freed + self.count != carved {
            return None;
        }
        Some(
            (0..carved)
                .filter(|&i| !free[i as usize])
                .map(|i| POOL_HEADER + i * self.block_size)
                .collect(),
        )
    }
}
