//! `pymem sites`, `pymem snapshot` and `pymem diff`: which Python lines hold
//! a process's memory, read from a running agent or a saved snapshot.
pub mod diff;
pub mod holders;
pub mod run;
pub mod snapshot;
mod table;
pub mod types;

pub use self::{
    holders::{HoldersArgs, run_holders},
    run::{RecordArgs, RunArgs, run_command, run_record},
    types::{TypesArgs, run_types},
};

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use self::snapshot::SiteSnapshot;
use crate::sites::{keys::GroupBy, state::Attribution};
use crate::{
    client::{AgentClient, AgentTarget, Caller},
    format,
};

#[derive(clap::Args)]
pub struct AgentArg {
    /// The pymem agent to ask (URL, HOST:PORT or port) [default: http://127.0.0.1:9477].
    /// A protected agent (--web-config-file) takes https:// and basic auth
    /// credentials from PYMEM_AGENT_USER and PYMEM_AGENT_PASSWORD (better
    /// for the password than https://USER:PASS@HOST:PORT, which `ps`
    /// shows).
    #[arg(long, value_name = "URL")]
    pub(crate) agent: Option<String>,
    #[command(flatten)]
    pub(crate) ca: AgentCaFile,
}

/// `--agent-ca-file`, beside every client command's `--agent`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentCaFile {
    /// PEM file of the CA that signed an https agent's certificate (the
    /// DaemonSet's self-signed one) [default: the system's roots].
    #[arg(long, value_name = "PATH", env = "PYMEM_AGENT_CA_FILE")]
    pub agent_ca_file: Option<PathBuf>,
}

impl AgentCaFile {
    /// The agent at `url` reached with this CA.
    pub fn target<'a>(&'a self, url: Option<&'a str>) -> AgentTarget<'a> {
        AgentTarget::new(url, self.agent_ca_file.as_deref())
    }
}

impl AgentArg {
    pub(crate) fn target(&self) -> AgentTarget<'_> {
        self.ca.target(self.agent.as_deref())
    }

    fn api(&self) -> Result<AgentClient> {
        AgentClient::new(self.target(), Caller::Command)
    }
}

#[derive(clap::Args)]
pub struct SitesArgs {
    /// A process observed by the agent, or a file saved by `pymem snapshot`
    /// (digits are a pid: write a file named 123 as ./123).
    #[arg(value_name = "PID|SNAPSHOT")]
    target: String,
    /// Print the sites as JSON (with their stacks) instead of a table.
    #[arg(long)]
    json: bool,
    /// Show at most N sites, heaviest first; 0 shows all. The pprof and
    /// flame graph files always hold every site.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    /// Write a pprof profile (gzip profile.proto; inuse_space, alloc_space)
    /// instead of the table.
    #[arg(long, value_name = "FILE")]
    pprof: Option<PathBuf>,
    /// Write a flame graph of live bytes (SVG) instead of the table.
    #[arg(long, value_name = "FILE")]
    flamegraph: Option<PathBuf>,
    /// How lines are charged: `heap-state` (an object census, which pauses
    /// the process briefly: each holder's retained bytes go to the lines
    /// that fill it), `allocation-samples` (the stacks that made the heap
    /// grow, no pause, biased toward code that allocates often), or `auto`
    /// (heap state where a census works).
    #[arg(long, value_enum, default_value_t = AttributionArg::Auto)]
    attribution: AttributionArg,
    /// What a site is: `app`, the innermost frame of the application's own
    /// code (outside the standard library, installed packages and the
    /// import machinery); `lineno`, the innermost frame; `function`; `file`;
    /// or `traceback`, the whole stack.
    #[arg(long, value_enum, default_value_t = GroupBy::App)]
    group_by: GroupBy,
    #[command(flatten)]
    agent: AgentArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttributionArg {
    Auto,
    HeapState,
    AllocationSamples,
}

impl AttributionArg {
    fn query(self) -> Option<&'static str> {
        match self {
            Self::Auto => None,
            Self::HeapState => Some("heap_state"),
            Self::AllocationSamples => Some("allocation_samples"),
        }
    }
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// A process observed by the agent.
    pid: u32,
    /// Where to write the snapshot (JSON).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    agent: AgentArg,
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The older snapshot.
    old: PathBuf,
    /// The newer snapshot.
    new: PathBuf,
    /// Print the differences as JSON.
    #[arg(long)]
    json: bool,
    /// Show at most N sites, biggest change first; 0 shows all.
    #[arg(long, value_name = "N", default_value_t = 10)]
    limit: usize,
}

pub fn run_sites(args: SitesArgs) -> Result<()> {
    let snapshot = match args.target.parse::<u32>() {
        Ok(pid) => SiteSnapshot::take_attributed(
            &args.agent.api()?,
            pid,
            args.attribution.query(),
            args.group_by,
        )?,
        Err(_) => {
            // A snapshot's sites are as its agent grouped them (by app
            // unless asked otherwise): coarser keys regroup them.
            let mut snapshot = SiteSnapshot::read(Path::new(&args.target))?;
            snapshot.sites = crate::sites::keys::regroup(&snapshot.sites, args.group_by);
            snapshot
        }
    };
    if let Some(path) = &args.pprof {
        write_pprof(&snapshot, path)?;
    }
    if let Some(path) = &args.flamegraph {
        write_flamegraph(&snapshot, path)?;
    }
    let exported = args.pprof.is_some() || args.flamegraph.is_some();
    if args.json {
        let shown = table::shown(snapshot.sites.len(), args.limit);
        print_json(&snapshot.sites[..shown])?;
    } else if !exported {
        print!("{}", table::sites_table(&snapshot, args.limit));
    }
    Ok(())
}

pub fn run_snapshot(args: SnapshotArgs) -> Result<()> {
    let snapshot = SiteSnapshot::take_with_census(&args.agent.api()?, args.pid)?;
    snapshot.write(&args.output)?;
    match (&snapshot.census, &snapshot.census_error) {
        (Some(census), _) => eprintln!("{}", types::census_summary(census)),
        (None, Some(error)) => eprintln!("no object census: {error}"),
        (None, None) => {}
    }
    eprintln!(
        "{}: {} sites, {} live, heap {} -> {}",
        snapshot.describe(),
        snapshot.sites.len(),
        format::bytes(snapshot.live_bytes()),
        format::bytes(snapshot.heap_bytes),
        args.output.display()
    );
    Ok(())
}

pub fn run_diff(args: DiffArgs) -> Result<()> {
    let old = SiteSnapshot::read(&args.old)?;
    let new = SiteSnapshot::read(&args.new)?;
    if old.pid != new.pid {
        eprintln!(
            "note: comparing different processes: {} and {}",
            old.describe(),
            new.describe()
        );
    }
    let attribution = |s: &SiteSnapshot| s.attribution.unwrap_or(Attribution::AllocationSamples);
    if attribution(&old) != attribution(&new) {
        eprintln!(
            "note: the snapshots' sites were attributed differently ({:?} then {:?}{}): their lines do not compare",
            attribution(&old),
            attribution(&new),
            new.attribution_note
                .as_deref()
                .or(old.attribution_note.as_deref())
                .map_or(String::new(), |n| format!("; {n}"))
        );
    }
    let mut diff = diff::compare(&old, &new);
    if args.json {
        diff.sites
            .truncate(table::shown(diff.sites.len(), args.limit));
        print_json(&diff)
    } else {
        print!("{}", diff::render_text(&diff, args.limit));
        Ok(())
    }
}

fn write_pprof(snapshot: &SiteSnapshot, path: &Path) -> Result<()> {
    let comments = [format!("pymem allocation sites of {}", snapshot.describe())];
    let profile =
        crate::sites::pprof::encode(&snapshot.sites, snapshot.taken_at_unix_nanos(), &comments)?;
    std::fs::write(path, profile).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote pprof profile of {} to {}",
        snapshot.describe(),
        path.display()
    );
    Ok(())
}

fn write_flamegraph(snapshot: &SiteSnapshot, path: &Path) -> Result<()> {
    let title = format!("{}: live bytes by allocation site", snapshot.describe());
    let svg = crate::sites::flamegraph::render_svg(&snapshot.sites, &title)
        .with_context(|| format!("no flame graph of {}", snapshot.describe()))?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote flame graph of {} to {}",
        snapshot.describe(),
        path.display()
    );
    Ok(())
}

fn print_json(value: &(impl serde::Serialize + ?Sized)) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
