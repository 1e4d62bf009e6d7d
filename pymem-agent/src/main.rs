//! `pymem`: a system-wide eBPF observer of CPython memory.
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use log::info;

use pymem_agent::{
    cli,
    discover::CmdlineMode,
    export,
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
    /// TLS and basic authentication, in the format of Prometheus' web
    /// configuration file (`tls_server_config`, `basic_auth_users`).
    #[arg(long, value_name = "FILE")]
    web_config_file: Option<std::path::PathBuf>,
    /// What of each process's command line the agent keeps and shows:
    /// `short` (executable and script), `full` or `none`. Default: `full`
    /// on a loopback --listen, `short` otherwise.
    #[arg(long, value_enum)]
    cmdline: Option<CmdlineMode>,
    /// Requests per second each client (IP address) may make to the routes
    /// that take censuses or symbolise sites; 0 = unlimited. Default: 2
    /// outside loopback, unlimited on a loopback --listen.
    #[arg(long, value_name = "PER_SECOND")]
    rate_limit: Option<f64>,
    /// Requests a client may make at once before --rate-limit applies.
    #[arg(long, value_name = "N", default_value_t = RATE_LIMIT_BURST)]
    rate_limit_burst: u32,
}

/// Outside loopback: enough for `pymem top` (sites, types and holders of
/// one process each refresh) and bursts of a script, not for a flood of
/// censuses.
const RATE_LIMIT: f64 = 2.0;
const RATE_LIMIT_BURST: u32 = 20;

impl AgentArgs {
    fn protection(&self) -> Result<export::Protection> {
        let web = match &self.web_config_file {
            Some(path) => export::WebConfig::load(path)?,
            None => export::WebConfig::open(),
        };
        let loopback = self.listen.ip().is_loopback();
        let per_second = match self.rate_limit {
            Some(rate) if !rate.is_finite() || rate < 0.0 => {
                anyhow::bail!(
                    "--rate-limit {rate}: not a rate (requests per second, 0 = unlimited)"
                )
            }
            Some(rate) => rate,
            None if loopback => 0.0,
            None => RATE_LIMIT,
        };
        Ok(export::Protection {
            web,
            rate_limit: (per_second > 0.0).then_some(export::RateLimit {
                per_second,
                burst: self.rate_limit_burst.max(1),
            }),
        })
    }
}

fn main() -> Result<()> {
    // A certificate the verifier rejects is explained by the error that
    // follows (naming --agent-ca-file); its own log line would say it twice.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,rustls_platform_verifier=off"),
    )
    .init();
    return_big_buffers_at_once();
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

/// The agent's big buffers are transient: a binary read for analysis
/// (15-25 MiB), a heap copied for a census. glibc's default raises its mmap
/// threshold to the size of the first such buffer freed, so later ones come
/// from the arenas and stay resident after they are freed: a one-way step of
/// the agent's RSS each time a bigger binary or heap comes along. A fixed
/// threshold keeps every buffer of 1 MiB or more in its own mapping, given
/// back to the system when it is freed.
fn return_big_buffers_at_once() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tunables; it is called
    // before any other thread exists.
    unsafe {
        const BIG: libc::c_int = 1 << 20;
        libc::mallopt(libc::M_MMAP_THRESHOLD, BIG);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * BIG);
    }
}

fn run_agent(args: AgentArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async move {
        // A bad web config file, then a busy port, fail before the probes
        // load: fast and clean.
        let protection = args.protection()?;
        let tls = protection.web.tls.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = export::AgentListener::new(export::bind(args.listen).await?, tls)?;
        let cmdline = args
            .cmdline
            .unwrap_or_else(|| CmdlineMode::default_for(&args.listen));
        let snapshot = Arc::new(RwLock::new(model::Snapshot::default()));
        let config = ObserverConfig {
            site_metrics: args.site_metrics,
            census: args.census.census_config(),
            cmdline,
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
            "serving {scheme}://{}/metrics and /api/v1/processes ({} users, command lines {cmdline:?}, rate limit {:?})",
            args.listen,
            protection.web.users.len(),
            protection.rate_limit,
        );
        let server = tokio::spawn(export::serve(
            listener,
            snapshot,
            queries,
            args.labels,
            protection,
        ));
        let result = observer.run(events, shutdown_signal()).await;
        server.abort();
        result
    });
    // The probes are detached by now. A census still parsing on a blocking
    // thread is not waited for: a stop (a pod's SIGTERM and its grace
    // period) should not wait for a heap copy to be counted.
    runtime.shutdown_background();
    served
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
