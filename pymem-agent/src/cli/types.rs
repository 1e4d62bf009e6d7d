//! `pymem types PID`: what a process's heap holds, live objects by type,
//! from an agent or, when none answers, from an embedded observer.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{AgentArg, print_json, table::shown};
use crate::{
    census::{Census, CensusReport, TypeGrowth, TypeStats},
    client::{AgentClient, Caller, is_refusal},
    format,
    observer::ObserverConfig,
    top::source::{EmbeddedObserver, Source},
};

/// How long an embedded observer gets to find the process.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args)]
pub struct TypesArgs {
    /// The Python process.
    pid: u32,
    /// Print the census as JSON (the agent's `/census` answer).
    #[arg(long)]
    json: bool,
    /// Take a census, wait DURATION (e.g. 10s), take another and show
    /// which types grew, biggest count growth first (objgraph's
    /// `show_growth()`, without a `gc.collect()`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    growth: Option<Duration>,
    /// Show at most N types; 0 shows all.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    agent: AgentArg,
}

pub fn run_types(args: TypesArgs) -> Result<()> {
    let source = connect(&args.agent)?;
    let pid = args.pid;
    let report = match args.growth {
        None => census_of(&source, pid, Duration::ZERO, false, 0)?,
        Some(wait) => {
            let first = census_of(&source, pid, Duration::ZERO, false, 1)?;
            eprintln!(
                "census 1 of pid {pid}: {} objects; the next in {}",
                first.census.heap.objects,
                humantime::format_duration(wait)
            );
            std::thread::sleep(wait);
            census_of(&source, pid, Duration::ZERO, true, 0)?
        }
    };
    if args.json {
        let mut report = report;
        report
            .census
            .heap
            .types
            .truncate(shown(report.census.heap.types.len(), args.limit));
        report
            .growth
            .truncate(shown(report.growth.len(), args.limit));
        print_json(&report)
    } else {
        print!(
            "{}",
            render_text(&report, args.growth.is_some(), args.limit)
        );
        Ok(())
    }
}

/// The agent at `--agent` (which must answer), else the default one if it
/// answers, else an observer in this process (root).
pub(super) fn connect(agent: &AgentArg) -> Result<Source> {
    let client = AgentClient::new(agent.target(), Caller::Command)?;
    match client.answers() {
        Ok(()) => return Ok(Source::Agent(client)),
        // An agent that wants credentials or another CA says so itself.
        Err(e) if is_refusal(&e) => return Err(e),
        Err(_) if agent.agent.is_some() => {
            bail!("no pymem agent answered at {}", client.base_url())
        }
        Err(_) => {}
    }
    let url = client.base_url().to_string();
    let observer = EmbeddedObserver::start(ObserverConfig::default()).with_context(|| {
        format!("no pymem agent answered at {url}, and observing from this process failed")
    })?;
    Ok(Source::Embedded(observer))
}

/// As `Source::census`, but an embedded observer first gets the time to
/// find the process.
fn census_of(
    source: &Source,
    pid: u32,
    max_age: Duration,
    growth: bool,
    limit: usize,
) -> Result<CensusReport> {
    discovered(source, pid)?;
    source.census(pid, max_age, growth, limit)
}

/// Errors unless `source` sees `pid`: an embedded observer first gets the
/// time to find it (an agent answers for itself).
pub(super) fn discovered(source: &Source, pid: u32) -> Result<()> {
    if let Source::Embedded(observer) = source
        && !observer.wait_for(pid, DISCOVERY_TIMEOUT)
    {
        bail!("pid {pid} is not a Python process this observer can see");
    }
    Ok(())
}

/// One line on the census: what was found and what it cost.
pub fn census_summary(census: &Census) -> String {
    format!(
        "pid {}: {} objects of {} types, {} ({}); paused {}, copied {} in {}, parsed in {}",
        census.pid,
        census.heap.objects,
        census.heap.types.len(),
        format::bytes(census.heap.object_bytes),
        census.consistency,
        seconds(census.pause_seconds),
        format::bytes(census.copied_bytes),
        seconds(census.copy_seconds),
        seconds(census.parse_seconds),
    )
}

pub(super) fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// The census as a table: the heaviest types, or their growth.
pub fn render_text(report: &CensusReport, growth: bool, limit: usize) -> String {
    let mut out = census_summary(&report.census);
    out.push('\n');
    for warning in &report.census.heap.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    if growth {
        if let Some(previous) = report.previous_taken_at {
            let _ = writeln!(
                out,
                "growth over {:.1} s since the previous census:",
                report.census.taken_at - previous
            );
        }
        out.push_str(&growth_table(&report.growth, limit));
    } else {
        out.push_str(&types_table(&report.census.heap.types, limit));
    }
    out
}

/// COUNT, BYTES, TYPE: heaviest first.
pub fn types_table(types: &[TypeStats], limit: usize) -> String {
    let shown = shown(types.len(), limit);
    let mut out = format!("{:>12}  {:>10}  TYPE\n", "COUNT", "BYTES");
    for t in &types[..shown] {
        let _ = writeln!(
            out,
            "{:>12}  {:>10}  {}",
            t.count,
            format::bytes(t.bytes),
            t.type_name
        );
    }
    if types.len() > shown {
        let _ = writeln!(
            out,
            "({} more types; --limit 0 shows all)",
            types.len() - shown
        );
    }
    out
}

/// COUNT, +COUNT, BYTES, +BYTES, TYPE: biggest count growth first.
pub fn growth_table(rows: &[TypeGrowth], limit: usize) -> String {
    if rows.is_empty() {
        return "no type changed\n".to_string();
    }
    let shown = shown(rows.len(), limit);
    let mut out = format!(
        "{:>12}  {:>10}  {:>10}  {:>11}  TYPE\n",
        "COUNT", "+COUNT", "BYTES", "+BYTES"
    );
    for g in &rows[..shown] {
        let _ = writeln!(
            out,
            "{:>12}  {:>+10}  {:>10}  {:>11}  {}",
            g.count,
            g.count_delta,
            format::bytes(g.bytes),
            signed_bytes(g.bytes_delta),
            g.type_name
        );
    }
    if rows.len() > shown {
        let _ = writeln!(
            out,
            "({} more types; --limit 0 shows all)",
            rows.len() - shown
        );
    }
    out
}

/// `+1.5 MiB`, `-200 B`, `0 B`.
pub fn signed_bytes(delta: i64) -> String {
    let sign = match delta.signum() {
        1 => "+",
        -1 => "-",
        _ => "",
    };
    format!("{sign}{}", format::bytes(delta.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{HeapCensus, PAUSED};

    fn report() -> CensusReport {
        let t = |name: &str, count, bytes| TypeStats {
            type_name: name.into(),
            count,
            bytes,
        };
        CensusReport {
            census: Census {
                pid: 42,
                taken_at: 100.0,
                consistency: PAUSED.into(),
                pause_seconds: 0.012,
                copy_seconds: 0.01,
                parse_seconds: 0.2,
                cpu_seconds: 0.0,
                copied_bytes: 64 << 20,
                heap: HeapCensus {
                    types: vec![
                        t("dict", 120_000, 30 << 20),
                        t("app.Leak", 50_000, 2_800_000),
                    ],
                    objects: 170_000,
                    object_bytes: (30 << 20) + 2_800_000,
                    ..HeapCensus::default()
                },
            },
            previous_taken_at: Some(90.0),
            growth: vec![TypeGrowth {
                type_name: "app.Leak".into(),
                count: 50_000,
                bytes: 2_800_000,
                count_delta: 50_000,
                bytes_delta: 2_800_000,
            }],
        }
    }

    #[test]
    fn tables_use_byte_units_and_say_what_is_hidden() {
        let text = render_text(&report(), false, 1);
        assert!(
            text.starts_with("pid 42: 170000 objects of 2 types"),
            "{text}"
        );
        assert!(
            text.contains("(paused); paused 12 ms, copied 64.0 MiB"),
            "{text}"
        );
        assert!(text.contains("      120000    30.0 MiB  dict\n"), "{text}");
        assert!(
            text.contains("(1 more types; --limit 0 shows all)"),
            "{text}"
        );
        let growth = render_text(&report(), true, 0);
        assert!(growth.contains("growth over 10.0 s"), "{growth}");
        assert!(growth.contains("+50000"), "{growth}");
        assert!(growth.contains("+2.7 MiB  app.Leak"), "{growth}");
        assert_eq!(signed_bytes(-200), "-200 B");
    }
}
