//! What pymem knows about CPython: per-version layouts, their validation
//! against the live process, line tables and code-object symbolisation.
pub mod layout_check;
pub mod linetable;
pub mod stacks;
