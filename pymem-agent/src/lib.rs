//! pymem's agent as a library: the `pymem` binary is a thin command line over
//! it, and the integration tests and xtask read its typed values.
pub mod bpf;
pub mod census;
pub mod cli;
pub mod client;
pub mod cpython;
pub mod discover;
pub mod export;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod holders;
pub mod k8s;
pub mod limits;
pub mod model;
pub mod observer;
pub mod recording;
pub mod report;
pub mod sites;
pub mod top;
