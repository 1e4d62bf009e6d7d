//! Reading a live CPython heap from a copy of its memory: every live object
//! counted and sized by type (the object census), version by version.
//!
//! Contract between the engine (this folder) and the census stage
//! (`crate::census`): the stage pauses the target, calls [`capture`] to copy
//! its memory, resumes it, then calls [`take_census`] on the copy, off the
//! observer's event loop.
use serde::{Deserialize, Serialize};

mod census;
mod image;
mod target;
#[cfg(test)]
mod tests;

pub use census::take_census;
pub use image::{HeapImage, Region, capture};
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
    /// What could not be read or validated (skipped pools, cut-off lists).
    pub warnings: Vec<String>,
}
