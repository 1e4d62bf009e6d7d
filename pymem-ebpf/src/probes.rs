//! One file per hook family.
mod arena;
mod budgeted;
mod extension;
mod gc;
mod lifecycle;
mod raw;
mod syscalls;
