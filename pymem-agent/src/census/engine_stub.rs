//! Stand-in for the heap engine (`crate::cpython::heap`) until it lands:
//! the same names and signatures, refusing every process. The lead swaps
//! `census::engine` to the real module when merging.
use crate::cpython::heap::HeapCensus;

/// A copy of the target's memory, taken while it was paused.
pub struct HeapImage {
    copied_bytes: u64,
}

impl HeapImage {
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }
}

/// Where one process's interpreter keeps its heap.
pub struct CensusTarget;

impl CensusTarget {
    pub fn for_process(_pid: u32, _binary: &crate::discover::Binary) -> anyhow::Result<Self> {
        Ok(Self)
    }
}

#[derive(Debug)]
pub enum CensusError {
    /// This build or layout cannot be read (the reason is kept).
    Unsupported(String),
    /// This attempt failed (the next may work).
    Failed(String),
}

pub fn capture(_pid: u32, _max_bytes: u64) -> anyhow::Result<HeapImage> {
    Ok(HeapImage { copied_bytes: 0 })
}

pub fn take_census(_image: &HeapImage, _target: &CensusTarget) -> Result<HeapCensus, CensusError> {
    Err(CensusError::Unsupported(
        "census engine not built yet".into(),
    ))
}
