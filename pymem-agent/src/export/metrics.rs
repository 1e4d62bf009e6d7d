//! Prometheus metrics: per-process series (labelled as `--labels` asks),
//! the agent's own counters and the optional per-site series, rendered
//! from a snapshot.
use std::collections::BTreeMap;

use anyhow::Result;
use axum::{
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

use super::AppState;
use crate::model::{ProcessInfo, Snapshot};

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

pub(super) async fn exposition(State(state): State<AppState>) -> impl IntoResponse {
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
    /// The smallest limit, the largest usage and the soonest time to a
    /// limit among the processes: the one to worry about first.
    memory_limit: Option<f64>,
    memory_usage: Option<f64>,
    time_to_limit: Option<f64>,
}

fn fold(current: Option<f64>, value: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (current, value) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

/// Renders the Prometheus text format from a snapshot.
pub fn render_metrics(snapshot: &Snapshot, labels: &[ProcessLabel]) -> Result<String> {
    let labels = &labels_in_use(labels, &snapshot.processes);
    let registry = Registry::new();
    let names: Vec<&str> = labels.iter().map(|l| l.name()).collect();
    let mut with_source = names.clone();
    with_source.push("source");

    let gauge = |name: &str, help: &str| -> Result<GaugeVec> {
        registered(&registry, GaugeVec::new(Opts::new(name, help), &names)?)
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
    let allocated = registered(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_allocated_bytes_total",
                "Bytes allocated since observation started, by source (arena, raw, extension, syscall)",
            ),
            &with_source,
        )?,
    )?;
    let freed = registered(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_freed_bytes_total",
                "Bytes freed since observation started, by source",
            ),
            &with_source,
        )?,
    )?;
    let memory_limit = gauge(
        "pymem_memory_limit_bytes",
        "Memory limit that applies to the process: the smallest cgroup memory.max (v2) or memory.limit_in_bytes (v1) up its hierarchy, else the host's MemTotal",
    )?;
    let memory_usage = gauge(
        "pymem_memory_usage_bytes",
        "Memory used in the cgroup whose limit applies (memory.current, memory.usage_in_bytes; MemTotal - MemAvailable for the host), page cache included",
    )?;
    let time_to_limit = gauge(
        "pymem_memory_limit_eta_seconds",
        "Seconds until the memory limit is reached at the heap's growth rate (0: reached); only for processes with a suspected leak",
    )?;
    let probe_hits = registered(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_probe_hits_total",
                "Per-allocation probe hits since observation started, each ~1-10 µs of the observed process's time; bounded by --probe-budget",
            ),
            &names,
        )?,
    )?;

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
        let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
        agg.memory_limit = fold(agg.memory_limit, as_f64(p.memory_limit_bytes), f64::min);
        agg.memory_usage = fold(agg.memory_usage, as_f64(p.memory_usage_bytes), f64::max);
        agg.time_to_limit = fold(agg.time_to_limit, p.time_to_limit_seconds, f64::min);
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
        for (gauge, value) in [
            (&memory_limit, agg.memory_limit),
            (&memory_usage, agg.memory_usage),
            (&time_to_limit, agg.time_to_limit),
        ] {
            if let Some(value) = value {
                gauge.with_label_values(&values).set(value);
            }
        }
        for (counters, totals) in [(&allocated, &agg.allocated), (&freed, &agg.freed)] {
            for (source, bytes) in totals {
                let mut with = values.clone();
                with.push(source);
                counters.with_label_values(&with).inc_by(*bytes);
            }
        }
    }

    let plain_gauge = |name: &str, help: &str, value: f64| -> Result<()> {
        registered(&registry, prometheus::Gauge::new(name, help)?)?.set(value);
        Ok(())
    };
    let plain_counter = |name: &str, help: &str, value: u64| -> Result<()> {
        registered(&registry, prometheus::IntCounter::new(name, help)?)?.inc_by(value);
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
        "pymem_malformed_event_records_total",
        "Ring buffer records skipped because they were not events",
        agent.malformed_records_total,
    )?;
    plain_counter(
        "pymem_inspections_dropped_total",
        "Inspections of new processes dropped because their queue was full (the next scan finds them)",
        agent.inspections_dropped_total,
    )?;
    plain_counter(
        "pymem_live_map_full_total",
        "Allocations not tracked because a kernel live-block map was full",
        agent.live_map_full_total,
    )?;
    let kernel_errors = registered(
        &registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_kernel_errors_total",
                "Kernel-side map operations that failed, by map (a full map or ring buffer: something went unrecorded)",
            ),
            &["map"],
        )?,
    )?;
    for (map, errors) in &agent.kernel_errors_total {
        kernel_errors.with_label_values(&[map]).inc_by(*errors);
    }
    let map_entries = registered(
        &registry,
        IntGaugeVec::new(
            Opts::new(
                "pymem_kernel_map_entries",
                "Entries of a kernel map after its last sweep (capacities: STACKS 32768, PROC_STATS 16384, ARENAS 262144, RAW_LIVE 1048576, EXT_LIVE 262144, SYS_LIVE 65536)",
            ),
            &["map"],
        )?,
    )?;
    for (map, entries) in &agent.kernel_map_entries {
        map_entries
            .with_label_values(&[map])
            .set(i64::try_from(*entries).unwrap_or(i64::MAX));
    }
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
        "pymem_oom_kills_total",
        "Observed Python processes the kernel killed for memory (post-mortems at /api/v1/oom-kills)",
        agent.oom_kills_total,
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
        "pymem_inspections_pending",
        "Processes waiting to be inspected (new ones, and retries while the loader maps libpython)",
        agent.inspections_pending as f64,
    )?;
    plain_gauge(
        "pymem_censuses_queued",
        "Object censuses waiting to run (asked for, or baselines and automatic ones held to --census-background-cpu)",
        agent.censuses_queued as f64,
    )?;
    plain_gauge(
        "pymem_probe_links",
        "uprobe attachments held by the agent",
        agent.probe_links as f64,
    )?;
    registered(
        &registry,
        IntGaugeVec::new(
            Opts::new("pymem_build_info", "Build information, always 1"),
            &["version"],
        )?,
    )?
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
    register_site_metrics(&registry, snapshot)?;
    register_type_metrics(&registry, snapshot)?;
    register_gc_metrics(&registry, snapshot, labels)?;

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// The garbage collector's series, for the processes whose collections
/// are (or were) counted, summed per label set like the others.
fn register_gc_metrics(
    registry: &Registry,
    snapshot: &Snapshot,
    labels: &[ProcessLabel],
) -> Result<()> {
    let names: Vec<&str> = labels.iter().map(|l| l.name()).collect();
    let mut with_generation = names.clone();
    with_generation.push("generation");
    let collections = registered(
        registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_gc_collections_total",
                "Garbage collections by generation since the collector's probes were attached",
            ),
            &with_generation,
        )?,
    )?;
    let seconds = registered(
        registry,
        prometheus::CounterVec::new(
            Opts::new(
                "pymem_gc_seconds_total",
                "Time spent in garbage collections since the collector's probes were attached",
            ),
            &names,
        )?,
    )?;
    let unreachable = registered(
        registry,
        IntCounterVec::new(
            Opts::new(
                "pymem_gc_unreachable_objects_total",
                "Objects garbage collections found unreachable (collected and uncollectable)",
            ),
            &names,
        )?,
    )?;
    for p in snapshot.processes.iter().filter(|p| p.gc.has_figures()) {
        let values: Vec<String> = labels.iter().map(|l| l.value(p)).collect();
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        for (generation, count) in ["0", "1", "2"].iter().zip(p.gc.collections) {
            let mut with = values.clone();
            with.push(generation);
            collections.with_label_values(&with).inc_by(count);
        }
        seconds.with_label_values(&values).inc_by(p.gc.seconds);
        unreachable
            .with_label_values(&values)
            .inc_by(p.gc.unreachable_objects);
    }
    Ok(())
}

/// `collector`, registered in `registry`: a clone that shares its values
/// (set before or after registering alike, as gathering reads them).
fn registered<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// `pymem_site_live_bytes` for the top sites the observer published (only
/// with `pymem agent --site-metrics N`): one series per process and line.
fn register_site_metrics(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    if snapshot.top_sites.is_empty() {
        return Ok(());
    }
    let gauge = IntGaugeVec::new(
        Opts::new(
            "pymem_site_live_bytes",
            "Live bytes allocated at one Python line (estimated from stack samples), for each process's top allocation sites",
        ),
        &["pid", "comm", "python_version", "function", "file", "line"],
    )?;
    for process in &snapshot.processes {
        let Some(sites) = snapshot.top_sites.get(&process.pid) else {
            continue;
        };
        let pid = process.pid.to_string();
        for site in sites {
            let line = site.line.to_string();
            gauge
                .with_label_values(&[
                    pid.as_str(),
                    &process.comm,
                    &process.python_version,
                    &site.function,
                    &site.file,
                    &line,
                ])
                .set(i64::try_from(site.bytes).unwrap_or(i64::MAX));
        }
    }
    registry.register(Box::new(gauge))?;
    Ok(())
}

/// `pymem_objects` and `pymem_object_bytes` for the heaviest types of each
/// process's latest census (only with `pymem agent --type-metrics N`).
fn register_type_metrics(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    if snapshot.top_types.is_empty() {
        return Ok(());
    }
    let labels = ["pid", "comm", "type"];
    let objects = registered(
        registry,
        IntGaugeVec::new(
            Opts::new(
                "pymem_objects",
                "Live objects of one type in the process's latest object census, for its heaviest types",
            ),
            &labels,
        )?,
    )?;
    let bytes = registered(
        registry,
        IntGaugeVec::new(
            Opts::new(
                "pymem_object_bytes",
                "Bytes (sys.getsizeof) of one type's live objects in the process's latest object census",
            ),
            &labels,
        )?,
    )?;
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for process in &snapshot.processes {
        let Some(types) = snapshot.top_types.get(&process.pid) else {
            continue;
        };
        let pid = process.pid.to_string();
        for t in types {
            let values = [pid.as_str(), process.comm.as_str(), t.type_name.as_str()];
            objects.with_label_values(&values).set(clamp(t.count));
            bytes.with_label_values(&values).set(clamp(t.bytes));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::TypeStats;

    fn process(pid: u32) -> ProcessInfo {
        let zero = serde_json::json!({"arena": 0, "raw": 0, "extension": 0, "syscall": 0});
        serde_json::from_value(serde_json::json!({
            "pid": pid, "ns_pid": pid, "comm": "python3", "cmdline": "python3 app.py",
            "python_version": "3.11.7", "binary": "/usr/bin/python3.11", "heap_bytes": 0,
            "heap": {"arena_bytes": 0, "raw_bytes": 0, "extension_bytes": 0, "syscall_bytes": 0},
            "growth_bytes_per_second": 0.0, "rss_bytes": 0, "leak_suspected": false,
            "allocated_bytes_total": 0, "freed_bytes_total": 0,
            "allocated_bytes_by_source": zero, "freed_bytes_by_source": zero,
            "accounting": "probes", "probe_hits_per_second": 0.0, "observed_seconds": 1.0,
            "heap_history": [],
        }))
        .unwrap()
    }

    #[test]
    fn limit_series_only_where_known_and_the_eta_only_for_leaks() {
        let mut limited = process(42);
        limited.memory_limit_bytes = Some(314_572_800);
        limited.memory_usage_bytes = Some(104_857_600);
        limited.memory_limit_source = Some("cgroup v2 memory.max /sys/fs/cgroup/app".into());
        limited.time_to_limit_seconds = Some(21.5);
        let mut host = process(43);
        host.memory_limit_bytes = Some(1 << 34);
        host.memory_usage_bytes = Some(1 << 32);
        let unknown = process(44);
        let snapshot = Snapshot {
            processes: vec![limited, host, unknown],
            ..Snapshot::default()
        };
        let text = render_metrics(&snapshot, &DEFAULT_LABELS).unwrap();
        let series = |name: &str, pid: u32| -> Option<String> {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("{name}{{")) && l.contains(&format!("pid=\"{pid}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(
            series("pymem_memory_limit_bytes", 42).as_deref(),
            Some("314572800")
        );
        assert_eq!(
            series("pymem_memory_usage_bytes", 42).as_deref(),
            Some("104857600")
        );
        assert_eq!(
            series("pymem_memory_limit_eta_seconds", 42).as_deref(),
            Some("21.5")
        );
        assert_eq!(
            series("pymem_memory_limit_bytes", 43).as_deref(),
            Some("17179869184")
        );
        assert_eq!(
            series("pymem_memory_limit_eta_seconds", 43),
            None,
            "no leak"
        );
        assert_eq!(
            series("pymem_memory_limit_bytes", 44),
            None,
            "unknown limit"
        );

        // Without pid, one command's processes: the soonest ETA, the
        // smallest limit.
        let text = render_metrics(&snapshot, &[ProcessLabel::Comm]).unwrap();
        assert!(
            text.contains("pymem_memory_limit_bytes{comm=\"python3\"} 314572800"),
            "{text}"
        );
        assert!(
            text.contains("pymem_memory_limit_eta_seconds{comm=\"python3\"} 21.5"),
            "{text}"
        );
    }

    #[test]
    fn oom_kills_are_one_agent_wide_counter() {
        let mut snapshot = Snapshot {
            processes: vec![process(42)],
            ..Snapshot::default()
        };
        snapshot.agent.oom_kills_total = 3;
        let text = render_metrics(&snapshot, &DEFAULT_LABELS).unwrap();
        assert!(
            text.lines().any(|l| l == "pymem_oom_kills_total 3"),
            "{text}"
        );
    }

    #[test]
    fn type_metrics_appear_only_for_published_types() {
        let mut snapshot = Snapshot {
            processes: vec![process(42)],
            ..Snapshot::default()
        };
        let labels = DEFAULT_LABELS.to_vec();
        let text = render_metrics(&snapshot, &labels).unwrap();
        assert!(!text.contains("pymem_objects"), "off by default");
        snapshot.top_types.insert(
            42,
            vec![TypeStats {
                type_name: "app.Leak".into(),
                count: 50_000,
                bytes: 2_800_000,
            }],
        );
        let text = render_metrics(&snapshot, &labels).unwrap();
        assert!(
            text.contains(r#"pymem_objects{comm="python3",pid="42",type="app.Leak"} 50000"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pymem_object_bytes{comm="python3",pid="42",type="app.Leak"} 2800000"#),
            "{text}"
        );
    }
}
