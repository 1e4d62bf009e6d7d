//! One file per hook family.
mod arena;
mod extension;
mod lifecycle;
mod raw;
mod syscalls;
