//! Recording Python processes for a while — `pymem run`'s command and its
//! descendants, `pymem record`'s pids — and what the recording comes to:
//! samples in (`recorder`), a per-process summary and the checks out
//! (`summary`), for the terminal, `--json`, `--format github` and the
//! HTML report (`crate::report`).
pub mod recorder;
pub mod summary;
pub mod units;

pub use self::{
    recorder::{Recorder, Recording, Sample},
    summary::{Checks, ProcessOutcome, RunSummary},
};
