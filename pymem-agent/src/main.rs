//! `pymem`: a system-wide eBPF observer of CPython memory.
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use log::info;

use pymem_agent::{
    cli, export,
    export::{DEFAULT_LISTEN, ProcessLabel},
    k8s, model,
    observer::{
        Observer, ObserverConfig,
        config::{self, ObserveArgs},
    },
    top,
};

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
    Sites(cli::SitesArgs),
    /// Save a process's allocation sites to a file, for `pymem diff`.
    Snapshot(cli::SnapshotArgs),
    /// Compare two snapshots: which lines' memory grew, like tracemalloc's
    /// `compare_to`.
    Diff(cli::DiffArgs),
    /// What a process's heap holds: live objects by type (an object
    /// census, which pauses the process while its heap is copied).
    Types(cli::TypesArgs),
    /// Which variables hold a process's memory: module globals, class
    /// attributes and frame locals by retained size (from an object census).
    Holders(cli::HoldersArgs),
    /// Run a command and report what its Python processes' heaps did;
    /// fails (status 99) on a leak or a limit when asked to (CI).
    Run(cli::RunArgs),
    /// Record running Python processes for a while and report the same.
    Record(cli::RecordArgs),
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
    #[arg(long, value_name = "N", default_value_t = config::SITE_METRICS)]
    site_metrics: usize,
    #[command(flatten)]
    census: config::CensusArgs,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(args),
        Command::Top(args) => top::run(args),
        Command::Sites(args) => cli::run_sites(args),
        Command::Snapshot(args) => cli::run_snapshot(args),
        Command::Diff(args) => cli::run_diff(args),
        Command::Types(args) => cli::run_types(args),
        Command::Holders(args) => cli::run_holders(args),
        Command::Run(args) => std::process::exit(cli::run_command(args)?),
        Command::Record(args) => std::process::exit(cli::run_record(args)?),
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
            census: args.census.census_config(),
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
