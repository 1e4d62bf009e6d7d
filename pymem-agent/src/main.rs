//! `pymem`: a system-wide eBPF observer of CPython memory.
mod attach;
mod discover;
mod events;
mod export;
mod flamegraph;
mod k8s;
mod model;
mod observer;
mod pprof;
mod pystack;
mod site_cli;
mod sites;
mod top;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use log::info;

use crate::{
    export::ProcessLabel,
    model::LeakPolicy,
    observer::{Observer, ObserverConfig},
};

/// The agent's default address: loopback only; expose it deliberately.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

#[derive(Parser)]
#[command(
    name = "pymem",
    version,
    about = "System-wide eBPF observer of CPython memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Observe every CPython process and serve metrics and the JSON API.
    Agent(AgentArgs),
    /// Live terminal view of every Python process's memory.
    Top(top::TopArgs),
    /// Which Python lines hold a process's memory (from the agent or a
    /// snapshot file); also writes pprof profiles and flame graphs.
    Sites(site_cli::SitesArgs),
    /// Save a process's allocation sites to a file, for `pymem diff`.
    Snapshot(site_cli::SnapshotArgs),
    /// Compare two snapshots: which lines' memory grew, like tracemalloc's
    /// `compare_to`.
    Diff(site_cli::DiffArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct ObserveArgs {
    /// Trailing window for growth rate and leak detection (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// How often the kernel counters are sampled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample_interval: Duration,
    /// Minimum growth over one window before a leak is suspected, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub leak_min_growth: u64,
    /// Per-process budget of allocation-probe hits per second (each costs
    /// ~1-10 µs); a process above it is moved to syscall accounting. 0
    /// disables the budget.
    #[arg(long, default_value_t = 1000)]
    pub probe_budget: u64,
    /// Allocation-probe hits a process may spend at once before the
    /// per-second budget applies (~5 ms of probe time at ~10 µs a hit).
    #[arg(long, default_value_t = 500)]
    pub probe_burst: u64,
    /// Process age before per-allocation probes are attached; until then
    /// (start-up imports) memory outside pymalloc is accounted by syscalls.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub probe_delay: Duration,
    /// Mean bytes between Python-stack samples of allocations outside
    /// pymalloc (arenas are always attributed); 0 disables sampling.
    #[arg(long, default_value_t = 256 << 10)]
    pub sample_bytes: u64,
    /// Size of the kernel-to-agent event ring buffer in bytes (a power of
    /// two, at least 4096). Events that do not fit are counted in
    /// pymem_events_lost_total.
    #[arg(long, default_value_t = 1 << 20, value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,
    /// One perf-event uprobe per hook, as on kernels before 6.6, even where
    /// multi-uprobe links work (to test that path).
    #[arg(long, hide = true)]
    pub perf_uprobes: bool,
}

fn parse_ring_size(value: &str) -> Result<u32, String> {
    let bytes: u32 = value.parse().map_err(|e| format!("{value:?}: {e}"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} is not a power of two >= 4096"));
    }
    Ok(bytes)
}

impl ObserveArgs {
    pub fn observer_config(&self) -> ObserverConfig {
        ObserverConfig {
            sample_interval: self.sample_interval,
            policy: LeakPolicy {
                window: self.window,
                min_growth_bytes: self.leak_min_growth as f64,
                ..LeakPolicy::default()
            },
            hit_budget_per_sec: self.probe_budget,
            hit_budget_burst: self.probe_burst,
            probe_delay: self.probe_delay,
            sample_bytes: self.sample_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            perf_uprobes: self.perf_uprobes,
            ..ObserverConfig::default()
        }
    }
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Address for /metrics and /api/v1 (HOST:PORT, or a port on 127.0.0.1).
    #[arg(long, default_value = DEFAULT_LISTEN, value_parser = export::parse_listen)]
    listen: SocketAddr,
    /// Labels of per-process series (comma-separated). Fewer labels, fewer
    /// series: without `pid`, processes sharing the other labels are summed.
    #[arg(long, value_delimiter = ',', default_values_t = export::DEFAULT_LABELS.to_vec(), value_enum)]
    labels: Vec<ProcessLabel>,
    /// Watch the Kubernetes API for the pod, namespace and container names
    /// of processes in containers (`auto`: only inside a cluster).
    #[arg(long, value_enum, default_value_t = k8s::KubernetesMode::Auto)]
    kubernetes: k8s::KubernetesMode,
    /// This node's name in Kubernetes (default: the hostname).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Kubeconfig for `--kubernetes always` outside a cluster (default: as
    /// kubectl finds it).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    #[command(flatten)]
    observe: ObserveArgs,
    /// Export `pymem_site_live_bytes` for each process's N heaviest
    /// allocation sites; 0 = off. Every site is a series: keep N small.
    #[arg(long, value_name = "N", default_value_t = 0)]
    site_metrics: usize,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(args),
        Command::Top(args) => top::run(args),
        Command::Sites(args) => site_cli::run_sites(args),
        Command::Snapshot(args) => site_cli::run_snapshot(args),
        Command::Diff(args) => site_cli::run_diff(args),
    }
}

fn run_agent(args: AgentArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Bind before loading probes: a busy port fails fast and clean.
        let listener = export::bind(args.listen).await?;
        let snapshot = Arc::new(RwLock::new(model::Snapshot::default()));
        let config = ObserverConfig {
            site_metrics: args.site_metrics,
            ..args.observe.observer_config()
        };
        let (observer, events, queries) = Observer::new(config, snapshot.clone())?;
        let pods = k8s::start_pod_cache(
            args.kubernetes,
            args.node_name.as_deref(),
            args.kubeconfig.as_deref(),
        )
        .await?;
        let observer = observer.with_pods(pods);
        info!(
            "serving http://{}/metrics and /api/v1/processes",
            args.listen
        );
        let server = tokio::spawn(export::serve(listener, snapshot, queries, args.labels));
        let result = observer.run(events, shutdown_signal()).await;
        server.abort();
        result
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
