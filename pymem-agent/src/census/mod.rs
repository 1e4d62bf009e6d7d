//! The object census stage: what a process's heap holds, by type, read
//! from a copy of its memory taken while it is paused.
//!
//! The observer asks ([`CensusStage`]); the work runs on blocking threads
//! ([`run`]), one census at a time agent-wide by default, and reports back
//! through the observer's channel. Each process keeps its last two
//! censuses, so that growth per type (objgraph's `show_growth()`, without
//! a `gc.collect()`) is always at hand.
pub mod growth;
pub mod pause;
pub mod run;
pub mod stage;

use serde::{Deserialize, Serialize};

pub use self::{
    growth::{TypeGrowth, growth},
    stage::{CensusAnswer, CensusConfig, CensusFailure, CensusStage},
};
/// The heap engine: every version-specific read of a heap copy.
use crate::cpython::heap as engine;
pub use crate::cpython::heap::{HeapCensus, TypeStats};

/// The consistency of a census of a paused process.
pub const PAUSED: &str = "paused";

/// One census of one process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Census {
    pub pid: u32,
    /// Unix time in seconds (fractional).
    pub taken_at: f64,
    /// `paused`, or `may be torn: <reason>` when the process could not be
    /// paused and was copied while it ran.
    pub consistency: String,
    /// How long the process was held still (0 when not paused).
    pub pause_seconds: f64,
    pub copy_seconds: f64,
    pub parse_seconds: f64,
    /// CPU time the agent spent on this census (pause, copy and parse),
    /// what `--census-background-cpu` paces by.
    #[serde(default)]
    pub cpu_seconds: f64,
    pub copied_bytes: u64,
    pub heap: HeapCensus,
}

impl Census {
    pub fn is_paused(&self) -> bool {
        self.consistency == PAUSED
    }
}

/// A census as the API serves it: the census, when the one before it was
/// taken, and with `?growth=1` the growth per type since then.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CensusReport {
    #[serde(flatten)]
    pub census: Census,
    #[serde(default)]
    pub previous_taken_at: Option<f64>,
    /// Biggest count growth first; empty unless asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub growth: Vec<TypeGrowth>,
}

impl CensusReport {
    /// The report of `answer`: with `growth`, the growth since the census
    /// before; `limit` (0 = all) cuts the types and the growth alike.
    pub fn new(answer: &CensusAnswer, growth: bool, limit: usize) -> Self {
        let mut census = (*answer.latest).clone();
        let growth = if growth {
            let previous = answer.previous.as_ref().map(|p| &p.heap);
            cut(self::growth(previous, &census.heap), limit)
        } else {
            Vec::new()
        };
        census.heap.types = cut(std::mem::take(&mut census.heap.types), limit);
        Self {
            census,
            previous_taken_at: answer.previous.as_ref().map(|p| p.taken_at),
            growth,
        }
    }

    /// The rows `/types` serves: the growth when asked for, else the types.
    pub fn rows(&self, growth: bool) -> Vec<TypeRow> {
        if growth {
            self.growth.iter().map(TypeRow::from).collect()
        } else {
            self.census.heap.types.iter().map(TypeRow::from).collect()
        }
    }
}

/// The first `limit` rows (0: all).
fn cut<T>(mut rows: Vec<T>, limit: usize) -> Vec<T> {
    if limit > 0 {
        rows.truncate(limit);
    }
    rows
}

/// One row of `/api/v1/processes/{pid}/types`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeRow {
    #[serde(rename = "type")]
    pub type_name: String,
    pub count: u64,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_delta: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_delta: Option<i64>,
}

impl From<&TypeStats> for TypeRow {
    fn from(t: &TypeStats) -> Self {
        Self {
            type_name: t.type_name.clone(),
            count: t.count,
            bytes: t.bytes,
            count_delta: None,
            bytes_delta: None,
        }
    }
}

impl From<&TypeGrowth> for TypeRow {
    fn from(g: &TypeGrowth) -> Self {
        Self {
            type_name: g.type_name.clone(),
            count: g.count,
            bytes: g.bytes,
            count_delta: Some(g.count_delta),
            bytes_delta: Some(g.bytes_delta),
        }
    }
}

/// The error body of the census routes: `{"error": "...", "pid": N}` plus
/// `"unsupported": true` when the process's build cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CensusErrorBody {
    pub error: String,
    pub pid: u32,
    #[serde(default)]
    pub unsupported: bool,
}

pub(crate) fn unix_seconds_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
