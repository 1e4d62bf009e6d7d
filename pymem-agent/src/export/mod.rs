//! Exporters: Prometheus metrics and the JSON API, both rendered from the
//! observer's latest snapshot.
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{
    model::{ProcessInfo, Snapshot},
    observer::{QuerySender, SharedSnapshot},
};

mod site_routes;

/// The agent's default address: loopback only; expose it deliberately.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

/// Labels that identify a process on per-process series. `pid` and `comm`
/// by default; dropping `pid` aggregates processes of one command.
/// `namespace`, `pod` and `container` name a process's Kubernetes pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum ProcessLabel {
    Pid,
    Comm,
    /// Also spelt as its label, `python_version`.
    #[value(alias = "python_version")]
    PythonVersion,
    Namespace,
    Pod,
    Container,
}

impl ProcessLabel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pid => "pid",
            Self::Comm => "comm",
            Self::PythonVersion => "python_version",
            Self::Namespace => "namespace",
            Self::Pod => "pod",
            Self::Container => "container",
        }
    }

    fn value(self, p: &ProcessInfo) -> String {
        match self {
            Self::Pid => p.pid.to_string(),
            Self::Comm => p.comm.clone(),
            Self::PythonVersion => p.python_version.clone(),
            // Empty for processes outside pods: see `labels_in_use`.
            Self::Namespace => p.container_info.namespace.clone().unwrap_or_default(),
            Self::Pod => p.container_info.pod.clone().unwrap_or_default(),
            Self::Container => p.container_info.container.clone().unwrap_or_default(),
        }
    }
}

/// The selected labels that some process has a value for. A metric family
/// has one set of label names (the prometheus crate enforces it), so a
/// process outside pods gets `pod=""`, which Prometheus stores as no label
/// at all; a label no process has (pod labels outside Kubernetes) is left
/// out of the exposition altogether.
fn labels_in_use(labels: &[ProcessLabel], processes: &[ProcessInfo]) -> Vec<ProcessLabel> {
    labels
        .iter()
        .copied()
        .filter(|label| processes.iter().any(|p| !label.value(p).is_empty()))
        .collect()
}

pub const DEFAULT_LABELS: [ProcessLabel; 3] = [
    ProcessLabel::Pid,
    ProcessLabel::Comm,
    ProcessLabel::PythonVersion,
];

#[derive(Clone)]
struct AppState {
    snapshot: SharedSnapshot,
    queries: QuerySender,
    labels: Vec<ProcessLabel>,
}

/// Binds first, so a busy port is a clear startup error, then serves until
/// the returned future is dropped.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another pymem agent running? use --listen)")
    })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: SharedSnapshot,
    queries: QuerySender,
    labels: Vec<ProcessLabel>,
) -> Result<()> {
    let state = AppState {
        snapshot,
        queries,
        labels,
    };
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/processes", get(processes))
        .route("/api/v1/processes/{pid}", get(process))
        .route(
            "/api/v1/processes/{pid}/sites",
            get(site_routes::sites_json),
        )
        .route(
            "/api/v1/processes/{pid}/pprof",
            get(site_routes::sites_pprof),
        )
        .route(
            "/api/v1/processes/{pid}/flamegraph.svg",
            get(site_routes::sites_flamegraph),
        )
        .with_state(state);
    axum::serve(listener, app).await.context("HTTP server")
}

async fn index() -> &'static str {
    "pymem agent\n\n/metrics                            Prometheus metrics\n/api/v1/processes                   observed Python processes (JSON)\n/api/v1/processes/N                 one process\n/api/v1/processes/N/sites           its allocation sites (JSON)\n/api/v1/processes/N/pprof           the same as a pprof profile (gzip profile.proto)\n/api/v1/processes/N/flamegraph.svg  a flame graph of their live bytes\n/healthz                            liveness\n"
}

async fn processes(State(state): State<AppState>) -> Json<Vec<ProcessInfo>> {
    Json(state.snapshot.read().expect("snapshot").processes.clone())
}

async fn process(State(state): State<AppState>, Path(pid): Path<u32>) -> impl IntoResponse {
    let snapshot = state.snapshot.read().expect("snapshot");
    match snapshot.processes.iter().find(|p| p.pid == pid) {
        Some(p) => Json(p.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("pid {pid} is not observed\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let snapshot = state.snapshot.read().expect("snapshot").clone();
    match render_metrics(&snapshot, &state.labels) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

/// Per-process values summed over the processes sharing one label set.
#[derive(Default)]
struct Aggregate {
    heap: f64,
    growth: f64,
    rss: f64,
    leak: f64,
    syscall_accounting: f64,
    probe_hits: u64,
    allocated: BTreeMap<&'static str, u64>,
    freed: BTreeMap<&'static str, u64>,
}

/// Renders the Prometheus text format from a snapshot.
pub fn render_metrics(snapshot: &Snapshot, labels: &[ProcessLabel]) -> Result<String> {
    let labels = &labels_in_use(labels, &snapshot.processes);
    let registry = Registry::new();
    let names: Vec<&str> = labels.iter().map(|l| l.name()).collect();
    let mut with_source = names.clone();
    with_source.push("source");

    let gauge = |name: &str, help: &str| -> Result<GaugeVec> {
        let g = GaugeVec::new(Opts::new(name, help), &names)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let heap = gauge(
        "pymem_heap_bytes",
        "Python heap: pymalloc arenas mapped + live blocks outside pymalloc + tracked extension buffers, since observation started",
    )?;
    let growth = gauge(
        "pymem_heap_growth_bytes_per_second",
        "Slope of pymem_heap_bytes over the trailing window",
    )?;
    let rss = gauge("pymem_rss_bytes", "Resident set size from procfs")?;
    let leak = gauge(
        "pymem_leak_suspected",
        "1 when the heap grew steadily over the whole trailing window",
    )?;
    let syscall_accounting = gauge(
        "pymem_syscall_accounting",
        "1 when memory outside pymalloc is accounted from brk/mmap syscalls (start-up, or over the probe budget) instead of per-allocation probes",
    )?;
    let allocated = IntCounterVec::new(
        Opts::new(
            "pymem_allocated_bytes_total",
            "Bytes allocated since observation started, by source (arena, raw, extension, syscall)",
        ),
        &with_source,
    )?;
    registry.register(Box::new(allocated.clone()))?;
    let freed = IntCounterVec::new(
        Opts::new(
            "pymem_freed_bytes_total",
            "Bytes freed since observation started, by source",
        ),
        &with_source,
    )?;
    registry.register(Box::new(freed.clone()))?;
    let probe_hits = IntCounterVec::new(
        Opts::new(
            "pymem_probe_hits_total",
            "Per-allocation probe hits since observation started, each ~1-10 µs of the observed process's time; bounded by --probe-budget",
        ),
        &names,
    )?;
    registry.register(Box::new(probe_hits.clone()))?;

    let mut groups: BTreeMap<Vec<String>, Aggregate> = BTreeMap::new();
    for p in &snapshot.processes {
        let key: Vec<String> = labels.iter().map(|l| l.value(p)).collect();
        let agg = groups.entry(key).or_default();
        agg.heap += p.heap_bytes as f64;
        agg.growth += p.growth_bytes_per_second;
        agg.rss += p.rss_bytes as f64;
        agg.probe_hits += p.probe_hits_total;
        agg.leak = agg.leak.max(f64::from(u8::from(p.leak_suspected)));
        agg.syscall_accounting = agg.syscall_accounting.max(f64::from(u8::from(
            p.accounting != crate::model::Accounting::Probes,
        )));
        for (source, bytes) in p.allocated_bytes_by_source.by_label() {
            *agg.allocated.entry(source).or_default() += bytes;
        }
        for (source, bytes) in p.freed_bytes_by_source.by_label() {
            *agg.freed.entry(source).or_default() += bytes;
        }
    }
    for (key, agg) in &groups {
        let values: Vec<&str> = key.iter().map(String::as_str).collect();
        heap.with_label_values(&values).set(agg.heap);
        growth.with_label_values(&values).set(agg.growth);
        rss.with_label_values(&values).set(agg.rss);
        leak.with_label_values(&values).set(agg.leak);
        syscall_accounting
            .with_label_values(&values)
            .set(agg.syscall_accounting);
        probe_hits.with_label_values(&values).inc_by(agg.probe_hits);
        for (counters, totals) in [(&allocated, &agg.allocated), (&freed, &agg.freed)] {
            for (source, bytes) in totals {
                let mut with = values.clone();
                with.push(source);
                counters.with_label_values(&with).inc_by(*bytes);
            }
        }
    }

    let plain_gauge = |name: &str, help: &str, value: f64| -> Result<()> {
        let g = prometheus::Gauge::new(name, help)?;
        g.set(value);
        registry.register(Box::new(g))?;
        Ok(())
    };
    let plain_counter = |name: &str, help: &str, value: u64| -> Result<()> {
        let c = prometheus::IntCounter::new(name, help)?;
        c.inc_by(value);
        registry.register(Box::new(c))?;
        Ok(())
    };
    let agent = &snapshot.agent;
    plain_gauge(
        "pymem_python_processes",
        "CPython processes observed",
        snapshot.processes.len() as f64,
    )?;
    plain_counter(
        "pymem_events_lost_total",
        "Kernel events dropped because the ring buffer was full",
        agent.events_lost_total,
    )?;
    plain_counter(
        "pymem_live_map_full_total",
        "Allocations not tracked because a kernel live-block map was full",
        agent.live_map_full_total,
    )?;
    plain_counter(
        "pymem_skipped_processes_total",
        "Python-looking processes that could not be observed (see the agent log)",
        agent.skipped_processes_total,
    )?;
    plain_counter(
        "pymem_attach_errors_total",
        "Failed probe attachments",
        agent.attach_errors_total,
    )?;
    plain_counter(
        "pymem_budget_switches_total",
        "Processes moved to syscall accounting for exceeding the probe budget",
        agent.budget_switches_total,
    )?;
    plain_gauge(
        "pymem_attached_binaries",
        "Interpreter binaries with arena probes attached",
        agent.attached_binaries as f64,
    )?;
    plain_gauge(
        "pymem_probe_links",
        "uprobe attachments held by the agent",
        agent.probe_links as f64,
    )?;
    let build_info = IntGaugeVec::new(
        Opts::new("pymem_build_info", "Build information, always 1"),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(build_info))?;
    site_routes::register_site_metrics(&registry, snapshot)?;

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// Parses the `--listen` value: `HOST:PORT`, or a bare port on 127.0.0.1.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|e| format!("{value:?} is not HOST:PORT: {e}"))
}
