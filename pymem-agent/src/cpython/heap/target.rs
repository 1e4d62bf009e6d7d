//! What the census must know about one process's interpreter: its version
//! and the run-time addresses of `_PyRuntime` and the exported types.
use anyhow::{Result, anyhow};

use crate::{
    cpython::{
        PyVersion,
        layout::load_bias,
        offsets::{VersionOffsets, offsets_for},
    },
    discover::Binary,
};

/// One process's interpreter, placed at the address it is loaded at.
#[derive(Clone, Debug)]
pub struct CensusTarget {
    pub version: PyVersion,
    pub free_threaded: bool,
    /// Run-time address and size of `_PyRuntime`.
    pub runtime: u64,
    pub runtime_size: u64,
    /// `_PyRuntimeState.interpreters.head` from `_Py_DebugOffsets` (3.13+).
    pub interpreters_head_offset: Option<u64>,
    /// Exported `*_Type` objects: symbol name and run-time address.
    pub static_types: Vec<(String, u64)>,
    /// `PyInterpreterState.threads.head` from `_Py_DebugOffsets` (3.13+).
    pub threads_head_offset: Option<u64>,
    /// Thread states and frames, for the locals of each thread's frames.
    pub(crate) frames: Option<VersionOffsets>,
}

impl CensusTarget {
    pub fn for_process(pid: u32, binary: &Binary) -> Result<CensusTarget> {
        let interp = &binary.interpreter;
        let runtime = interp
            .runtime_vaddr
            .ok_or_else(|| anyhow!("{} exports no _PyRuntime", binary.display_path))?;
        let bias = load_bias(pid, binary)?;
        Ok(Self::at_bias(interp, runtime, bias))
    }

    fn at_bias(interp: &crate::discover::Interpreter, runtime: u64, bias: u64) -> Self {
        Self {
            version: interp.version,
            free_threaded: interp.free_threaded,
            runtime: runtime.wrapping_add(bias),
            runtime_size: interp.runtime_size,
            interpreters_head_offset: interp.stack_offsets.map(|s| s.runtime_interpreters_head),
            static_types: interp
                .static_types
                .iter()
                .map(|(name, addr)| (name.clone(), addr.wrapping_add(bias)))
                .collect(),
            threads_head_offset: interp.stack_offsets.map(|s| s.interp_threads_head),
            frames: offsets_for(interp),
        }
    }

    pub(crate) fn static_type(&self, symbol: &str) -> Option<u64> {
        self.static_types
            .iter()
            .find(|(name, _)| name == symbol)
            .map(|&(_, addr)| addr)
    }
}

/// Why a census was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CensusError {
    /// This build or its layout is not one the census can read correctly.
    Unsupported(String),
    /// The copy could not be read as a heap.
    Failed(String),
}

impl std::fmt::Display for CensusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported(why) => write!(f, "object census unsupported: {why}"),
            Self::Failed(why) => write!(f, "object census failed: {why}"),
        }
    }
}

impl std::error::Error for CensusError {}
