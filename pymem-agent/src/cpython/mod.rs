//! What pymem knows about CPython, version by version: which version a
//! binary is, its `_Py_DebugOffsets`, its arena size, where its structures
//! keep what a stack walk reads, the check of those offsets against a live
//! process, line tables and code-object symbolisation.
//!
//! Porting to a new CPython version (say 3.15) touches this folder:
//! - `offsets.rs`: the version's row in the offset table (thread state,
//!   frame, code object), and its test's `future` version;
//! - `debug_offsets.rs`: where the fields sit inside that version's
//!   `_Py_DebugOffsets` (`debug_offsets_layout`), and `DEBUG_OFFSETS_READ` if
//!   the table grew;
//! - `symbolize.rs` and `linetable.rs` if the code object, `str` header or
//!   line table format changes (`LineFormat`);
//! - `version.rs` if pymalloc's arena size changes (`PyVersion::arena_size`);
//! - `testing.rs` to have the tests find an interpreter of that version.
//!
//! `layout_check.rs` only checks the versions without `_Py_DebugOffsets`
//! (3.8–3.11). Outside this folder, only pymem-ebpf's stack walk
//! (`pystack.rs`) and pymem-common's `PyLayout` it reads, and only if the
//! shape of the walk changes (another indirection, tag or frame owner kind):
//! new offsets alone need no kernel change.
pub mod arena;
pub mod debug_offsets;
pub mod heap;
pub mod layout;
pub mod layout_check;
pub mod linetable;
pub mod memory;
pub mod offsets;
pub mod symbolize;
#[cfg(test)]
pub(crate) mod testing;
pub mod version;

pub use debug_offsets::{DebugOffsets, StackDebugOffsets};
pub use layout::{ProcessLayout, layout_for};
pub use symbolize::{Frame, Symbolizer};
pub use version::PyVersion;

/// What version detection reads from an interpreter binary, whatever its
/// file format: exported symbols and the initialised bytes at link addresses.
pub trait BinaryImage {
    /// The link address of a symbol the binary defines and exports.
    fn symbol(&self, name: &str) -> Option<u64>;
    /// The `len` bytes at link address `vaddr`, as the file initialises them.
    fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]>;
}
