//! One file per hook family.
mod arena;
mod budgeted;
mod extension;
mod gc;
mod lifecycle;
mod oom;
mod raw;
mod syscalls;
