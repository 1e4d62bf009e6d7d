//! Site snapshots: one process's allocation sites at one moment, saved as
//! JSON by `pymem snapshot` and read back by `pymem diff` and `pymem sites`.
use std::{
    fs::File,
    io::{BufReader, BufWriter, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    census::Census,
    client::AgentClient,
    holders::{self, SNAPSHOT_DEPTH, SNAPSHOT_HOLDERS},
    sites::{Site, keys::GroupBy, state::Attribution},
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteSnapshot {
    pub pid: u32,
    pub comm: String,
    pub python_version: String,
    /// Unix time in seconds (fractional).
    pub taken_at: f64,
    /// The process's Python heap when the sites were read.
    pub heap_bytes: u64,
    /// Heaviest live bytes first, as the agent lists them.
    pub sites: Vec<Site>,
    /// How the sites were attributed (absent in snapshots of older agents:
    /// allocation samples), and why not by heap state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution_note: Option<String>,
    /// The object census taken with the snapshot (its heaviest types, and
    /// its heaviest holders with two levels of children), if one could be
    /// taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census: Option<Census>,
    /// Why there is no census.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_error: Option<String>,
}

/// How old a census the snapshot may share with its sites.
const SITES_CENSUS_REUSE: Duration = Duration::from_secs(10);

/// Types a snapshot keeps of its census.
pub const SNAPSHOT_TYPES: usize = 200;

impl SiteSnapshot {
    /// Reads the process and then its sites from the agent: both within
    /// one sample interval, so the heap and the sites agree.
    pub fn take(agent: &AgentClient, pid: u32) -> Result<Self> {
        Self::take_attributed(agent, pid, None, GroupBy::App)
    }

    /// As `take`, the attribution forced (`heap_state`,
    /// `allocation_samples`) or not (None), grouped by `group_by`.
    pub fn take_attributed(
        agent: &AgentClient,
        pid: u32,
        attribution: Option<&str>,
        group_by: GroupBy,
    ) -> Result<Self> {
        let process = agent.process(pid)?;
        let report = agent.sites_report(pid, Duration::ZERO, attribution, group_by)?;
        Ok(Self {
            pid: process.pid,
            comm: process.comm,
            python_version: process.python_version,
            taken_at: crate::census::unix_seconds_now(),
            heap_bytes: process.heap_bytes,
            sites: report.sites,
            attribution: Some(report.attribution),
            attribution_note: report.note,
            census: None,
            census_error: None,
        })
    }

    /// As `take`, plus an object census (which pauses the process); a
    /// census that fails leaves its reason instead.
    pub fn take_with_census(agent: &AgentClient, pid: u32) -> Result<Self> {
        let mut snapshot = Self::take(agent, pid)?;
        // The census the sites were just attributed by, if they were.
        match agent.census(pid, SITES_CENSUS_REUSE, false, SNAPSHOT_TYPES) {
            Ok(report) => {
                let mut census = report.census;
                holders::keep(&mut census.heap.holders, SNAPSHOT_HOLDERS, SNAPSHOT_DEPTH);
                snapshot.census = Some(census);
            }
            Err(e) => snapshot.census_error = Some(format!("{e:#}")),
        }
        Ok(snapshot)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening snapshot {}", path.display()))?;
        serde_json::from_reader(BufReader::new(file))
            .with_context(|| format!("{} is not a pymem site snapshot", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer(&mut out, self)?;
        writeln!(out)?;
        out.flush()
            .with_context(|| format!("writing {}", path.display()))
    }

    /// `pid 4242 (python3, Python 3.11.7)`
    pub fn describe(&self) -> String {
        format!(
            "pid {} ({}, Python {})",
            self.pid, self.comm, self.python_version
        )
    }

    pub fn live_bytes(&self) -> u64 {
        self.sites.iter().map(|s| s.bytes).sum()
    }

    pub fn taken_at_unix_nanos(&self) -> i64 {
        (self.taken_at * 1e9) as i64
    }
}
