//! Reading a live CPython heap from a copy of its memory: every live object
//! counted and sized by type (the object census), version by version.
//!
//! Contract between the engine (this folder) and the census stage
//! (`crate::census`): the stage pauses the target, calls [`capture`] to copy
//! its memory, resumes it, then calls [`take_census`] on the copy, off the
//! observer's event loop. The same pass finds what holds the memory
//! ([`HeapHolders`]): roots by retained size, from the reference graph.
use serde::{Deserialize, Serialize};

mod census;
mod image;
mod target;
#[cfg(test)]
mod tests;

pub use census::take_census;
pub use image::{Bytes, HeapImage, Region, capture, check_size};
pub use target::{CensusError, CensusTarget};

/// One type's live objects, as Python names the type (`dict`, `str`,
/// `module.QualName` for classes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeStats {
    #[serde(rename = "type")]
    pub type_name: String,
    pub count: u64,
    /// Sum of `sys.getsizeof` of its objects (shallow, as guppy and pympler
    /// report).
    pub bytes: u64,
}

/// What one census found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapCensus {
    /// Every type with live objects, heaviest first.
    pub types: Vec<TypeStats>,
    pub objects: u64,
    /// Sum of every object's `bytes`.
    pub object_bytes: u64,
    /// Objects found on the GC's generation lists.
    pub gc_tracked: u64,
    /// pymalloc arenas in use and their mapped bytes (arena size each).
    pub arenas: u64,
    pub arena_bytes: u64,
    /// Bytes of blocks in use in pymalloc pools.
    pub pool_used_bytes: u64,
    /// Blocks in use in pools that are not objects the census could type
    /// (out-of-line buffers: dict key tables, list item arrays, …).
    pub unattributed_bytes: u64,
    /// Objects and buffers outside pymalloc (libc malloc), reached from
    /// objects.
    pub outside_pymalloc_bytes: u64,
    /// Objects whose size fields claim more memory than they have (a
    /// process that damaged its own heap, or one paused mid-update),
    /// counted at their base size; a warning names their types.
    #[serde(default)]
    pub damaged_objects: u64,
    /// What could not be read or validated (skipped pools, cut-off lists).
    pub warnings: Vec<String>,
    /// What holds the memory (module globals, class attributes, frame
    /// locals), by retained size.
    #[serde(default)]
    pub holders: HeapHolders,
}

/// The roots that keep the heap alive, heaviest retained first, from a
/// dominator tree over the reference graph of the census's copy. Only
/// names (of globals, attributes, locals, types), lengths and sizes: never
/// values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapHolders {
    /// Roots, heaviest `retained_bytes` first (the heaviest few hundred).
    pub holders: Vec<Holder>,
    /// Bytes of the census's objects some root reaches.
    pub reachable_bytes: u64,
    /// Bytes of the census's objects no root reaches: garbage awaiting the
    /// collector, or held by C code or by objects the graph does not follow.
    pub unreachable_bytes: u64,
    /// Types whose referents the graph does not decode: their objects
    /// count their own size and nothing behind them is followed.
    pub opaque_types: Vec<String>,
    /// Why the holders are incomplete or missing (an unreadable
    /// `sys.modules`, a graph cut at its memory budget, …).
    pub warnings: Vec<String>,
}

/// One holder: a root, or (in `children`) the objects under one edge of
/// its dominator subtree grouped by type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// A root: `module.global` (`__main__.CACHE`), `module.Class.attr`, or
    /// `thread N / function / local` for a frame local. A child: the edge
    /// from its parent (`[*]` for container items, `values`, `keys`,
    /// `.attr` for an attribute).
    pub name: String,
    /// The type, as Python names it (`dict`, `module.QualName`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// `len()` of a root that is a container; None otherwise (and for
    /// children, which are groups).
    pub length: Option<u64>,
    /// Objects this entry stands for: 1 for a root; for a child, the
    /// objects of this type under this edge.
    pub count: u64,
    /// What would be freed if this root's reference were dropped (for a
    /// child: the sum over its objects of what only they keep alive).
    pub retained_bytes: u64,
    /// Everything reachable from it, shared objects included (immortal and
    /// shared objects — types, modules, code, interned strings, small ints
    /// — excluded).
    pub deep_bytes: u64,
    /// The heaviest children by retained size, a few levels deep.
    pub children: Vec<Holder>,
    /// A root's writers: the lines whose bytecode stores into it (or into
    /// the attribute of it that holds most of its memory), most specific
    /// first. Empty when none was found, and for children.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writers: Vec<Writer>,
}

/// A line that fills a holder: `CACHE[key] =` in `handle` at app.py:34.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub function: String,
    pub file: String,
    pub line: i64,
    /// The store as source: `CACHE[key] =`, `VISITORS.append()`,
    /// `self.cache =`.
    pub store: String,
}
