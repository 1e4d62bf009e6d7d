//! What a run or a recording comes to, per Python process: peak and final
//! heap, the growth after the warm-up and the leak verdict, the sites and
//! types that grew; and the checks (`--fail-on-leak`, `--max-heap`,
//! `--max-growth`) judged on them.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{
    recorder::{Recording, Sample},
    units::Warmup,
};
use crate::{
    census::{TypeGrowth, growth},
    cpython::Frame,
    format,
    model::{Accounting, HeapBaseline, HeapBreakdown, HeapHistory, LeakPolicy},
    sites::Site,
};

/// Samples a judgement needs after the warm-up, and the seconds they span.
const MIN_JUDGED_SAMPLES: usize = 5;
const MIN_JUDGED_SECONDS: f64 = 2.0;
/// A heap that keeps growing grows in the last third of the judged window
/// too, at no less than this share of the window's rate; one that grew
/// and then levelled off (a cache filling up) does not.
const TAIL_SHARE: f64 = 0.25;
/// Sites and types listed per process.
const TOP_ROWS: usize = 10;

/// The checks a run is judged by.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Checks {
    pub fail_on_leak: bool,
    pub max_heap_bytes: Option<u64>,
    pub max_growth_bytes_per_second: Option<f64>,
}

/// How the heap behaved after the warm-up.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// It kept growing, steadily, to the end.
    Leak,
    /// It grew and then levelled off.
    Plateau,
    /// It went up and down without a steady trend.
    Churn,
    /// It grew less than the leak threshold (or shrank).
    Flat,
    /// Too few samples after the warm-up to tell.
    TooShort,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub leaking: bool,
    pub reason: String,
}

/// A site whose live bytes grew after the warm-up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteGrowth {
    pub function: String,
    pub file: String,
    pub line: i64,
    pub growth_bytes: i64,
    /// Live bytes at the end.
    pub bytes: u64,
    pub stack: Vec<Frame>,
}

/// One Python process of the run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessOutcome {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub python_version: String,
    pub binary: String,
    pub accounting: Accounting,
    pub heap_baseline: HeapBaseline,
    /// Seconds into the run of its first and last sample.
    pub first_seen_seconds: f64,
    pub last_seen_seconds: f64,
    pub peak_heap_bytes: u64,
    pub peak_heap: HeapBreakdown,
    pub final_heap_bytes: u64,
    pub final_heap: HeapBreakdown,
    pub peak_rss_bytes: u64,
    pub final_rss_bytes: u64,
    /// The window the verdict judges: from the end of the warm-up to the
    /// last sample (seconds into the run).
    pub judged_from_seconds: f64,
    pub judged_to_seconds: f64,
    /// Least-squares slope of the heap over the judged window, and how
    /// well a line fits it (R²).
    pub growth_bytes_per_second: f64,
    pub growth_fit: f64,
    pub verdict: Verdict,
    pub growing_sites: Vec<SiteGrowth>,
    pub growing_types: Vec<TypeGrowth>,
    /// Why there are no types, when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types_note: Option<String>,
    pub samples: Vec<Sample>,
    /// The sites at the end with their stacks, for the flame graph.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_sites: Vec<Site>,
}

/// A check that failed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub pid: u32,
    /// `leak`, `max_heap` or `max_growth`.
    pub check: String,
    pub reason: String,
}

/// The whole run, as `--json` writes it and the report shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    /// What was observed: the command of `pymem run`, the pids of
    /// `pymem record`.
    pub target: String,
    /// Where the data came from: the embedded observer or an agent.
    pub source: String,
    pub duration_seconds: f64,
    /// The command's exit status (`pymem run`): its code, or 128 + the
    /// signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    pub warmup: String,
    pub checks: Checks,
    pub failures: Vec<Failure>,
    pub processes: Vec<ProcessOutcome>,
}

impl RunSummary {
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// The outcome of one recording, judged after `warmup` of the whole run.
pub fn outcome(
    recording: &Recording,
    run_seconds: f64,
    warmup: Warmup,
    policy: &LeakPolicy,
) -> ProcessOutcome {
    let samples = without_teardown(&recording.samples);
    let info = &recording.info;
    let first = samples.first().map_or(0.0, |s| s.t);
    let last = samples.last().map_or(0.0, |s| s.t);
    let judged_from = (first + warmup.seconds(run_seconds)).min(last);
    let peak = samples
        .iter()
        .max_by_key(|s| s.heap_bytes)
        .copied()
        .unwrap_or(Sample {
            t: 0.0,
            heap_bytes: info.heap_bytes,
            heap: info.heap,
            rss_bytes: info.rss_bytes,
        });
    let end = samples.last().copied().unwrap_or(peak);
    let judged: Vec<&Sample> = samples.iter().filter(|s| s.t >= judged_from).collect();
    let (trend, verdict) = judge(&judged, policy);
    let baseline_sites = snapshot_at(&recording.sites, judged_from);
    let final_sites = recording
        .sites
        .last()
        .map(|(_, sites)| sites.clone())
        .unwrap_or_default();
    let (growing_types, types_note) = type_growth(recording, judged_from);
    ProcessOutcome {
        pid: info.pid,
        comm: info.comm.clone(),
        cmdline: info.cmdline.clone(),
        python_version: info.python_version.clone(),
        binary: info.binary.clone(),
        accounting: info.accounting,
        heap_baseline: info.heap_baseline,
        first_seen_seconds: first,
        last_seen_seconds: last,
        peak_heap_bytes: peak.heap_bytes,
        peak_heap: peak.heap,
        final_heap_bytes: end.heap_bytes,
        final_heap: end.heap,
        peak_rss_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        final_rss_bytes: end.rss_bytes,
        judged_from_seconds: judged_from,
        judged_to_seconds: last,
        growth_bytes_per_second: trend.slope,
        growth_fit: trend.fit,
        verdict,
        growing_sites: site_growth(baseline_sites, &final_sites),
        growing_types,
        types_note,
        samples: samples.to_vec(),
        final_sites,
    }
}

/// Trailing samples a teardown may take: an interpreter frees its heap
/// in well under a second when it exits.
const TEARDOWN_SAMPLES: usize = 3;

/// The samples without the process's teardown: when a process exits, its
/// interpreter frees everything, and the last samples can catch it doing
/// so; those say nothing of how the program used memory, so trailing
/// samples that each fall below the one before are left out.
fn without_teardown(samples: &[Sample]) -> &[Sample] {
    let mut end = samples.len();
    while end >= 2
        && samples.len() - end < TEARDOWN_SAMPLES
        && samples[end - 1].heap_bytes < samples[end - 2].heap_bytes
    {
        end -= 1;
    }
    &samples[..end]
}

/// The trend of the judged samples and what it says: a leak is steady
/// growth (a good linear fit, at least the policy's minimum over the
/// window) that goes on in the window's last third.
fn judge(judged: &[&Sample], policy: &LeakPolicy) -> (crate::model::Trend, Verdict) {
    let verdict = |kind, reason: String| Verdict {
        kind,
        leaking: kind == VerdictKind::Leak,
        reason,
    };
    let span = match (judged.first(), judged.last()) {
        (Some(a), Some(b)) => b.t - a.t,
        _ => 0.0,
    };
    if judged.len() < MIN_JUDGED_SAMPLES || span < MIN_JUDGED_SECONDS {
        return (
            crate::model::Trend::default(),
            verdict(
                VerdictKind::TooShort,
                format!(
                    "too short to judge: {} samples over {} after the warm-up",
                    judged.len(),
                    format::duration(span)
                ),
            ),
        );
    }
    let trend = trend_of(judged);
    let grown = trend.slope * span;
    let minimum = policy.min_growth_bytes;
    let judged_verdict = if trend.slope <= 0.0 || grown < minimum {
        verdict(
            VerdictKind::Flat,
            format!(
                "grew {} over {} after the warm-up, under the leak threshold of {}",
                signed_bytes(grown),
                format::duration(span),
                format::bytes(minimum as u64)
            ),
        )
    } else if trend.fit < policy.min_fit {
        verdict(
            VerdictKind::Churn,
            format!(
                "the heap goes up and down without a steady trend after the warm-up (R² {:.2} < {:.2}): churn, not a leak",
                trend.fit, policy.min_fit
            ),
        )
    } else {
        let tail_from = judged.len() - judged.len().div_ceil(3);
        let tail = trend_of(&judged[tail_from.min(judged.len() - 2)..]);
        if tail.slope < trend.slope * TAIL_SHARE {
            verdict(
                VerdictKind::Plateau,
                format!(
                    "grew {} after the warm-up, then levelled off ({} in the last third): a plateau, not a leak",
                    signed_bytes(grown),
                    format::rate_per_minute(tail.slope)
                ),
            )
        } else {
            verdict(
                VerdictKind::Leak,
                format!(
                    "the heap kept growing after the warm-up: {} over {} at {} (R² {:.2}), still growing at the end",
                    signed_bytes(grown),
                    format::duration(span),
                    format::rate_per_minute(trend.slope),
                    trend.fit
                ),
            )
        }
    };
    (trend, judged_verdict)
}

fn trend_of(samples: &[&Sample]) -> crate::model::Trend {
    let mut history = HeapHistory::default();
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return crate::model::Trend::default();
    };
    let span = last.t - first.t;
    for s in samples {
        history.push(s.t, s.heap_bytes, f64::INFINITY);
    }
    history.trend(span)
}

fn signed_bytes(bytes: f64) -> String {
    if bytes < 0.0 {
        format!("-{}", format::bytes(bytes.abs() as u64))
    } else {
        format!("+{}", format::bytes(bytes as u64))
    }
}

/// The latest reading at or before `t`, else the first.
fn snapshot_at<T>(readings: &[(f64, T)], t: f64) -> Option<&T> {
    readings
        .iter()
        .rev()
        .find(|(at, _)| *at <= t)
        .or(readings.first())
        .map(|(_, value)| value)
}

/// Sites whose live bytes grew from `baseline` to `last`, most first.
fn site_growth(baseline: Option<&Vec<Site>>, last: &[Site]) -> Vec<SiteGrowth> {
    let before: HashMap<(&str, &str, i64), u64> = baseline
        .map(|sites| {
            sites
                .iter()
                .map(|s| ((s.function.as_str(), s.file.as_str(), s.line), s.bytes))
                .collect()
        })
        .unwrap_or_default();
    let mut grown: Vec<SiteGrowth> = last
        .iter()
        .map(|s| {
            let was = before
                .get(&(s.function.as_str(), s.file.as_str(), s.line))
                .copied()
                .unwrap_or(0);
            SiteGrowth {
                function: s.function.clone(),
                file: s.file.clone(),
                line: s.line,
                growth_bytes: s.bytes as i64 - was as i64,
                bytes: s.bytes,
                stack: s.frames().into_owned(),
            }
        })
        .filter(|s| s.growth_bytes > 0)
        .collect();
    grown.sort_by_key(|s| std::cmp::Reverse(s.growth_bytes));
    grown.truncate(TOP_ROWS);
    grown
}

/// Types whose bytes grew from the census at the end of the warm-up to
/// the last one, most first.
fn type_growth(recording: &Recording, judged_from: f64) -> (Vec<TypeGrowth>, Option<String>) {
    let censuses = &recording.censuses;
    let Some((last_at, last)) = censuses.last() else {
        let note = recording
            .census_error
            .clone()
            .unwrap_or_else(|| "no object census was taken".to_string());
        return (Vec::new(), Some(note));
    };
    let baseline = snapshot_at(censuses, judged_from);
    if censuses.len() < 2 {
        return (
            Vec::new(),
            Some(format!(
                "one object census only (at {:.0} s): growth needs two",
                last_at
            )),
        );
    }
    let mut rows: Vec<TypeGrowth> = growth(baseline, last)
        .into_iter()
        .filter(|g| g.bytes_delta > 0)
        .collect();
    rows.sort_by_key(|g| std::cmp::Reverse(g.bytes_delta));
    rows.truncate(TOP_ROWS);
    (rows, None)
}

/// The checks' failures over every process.
pub fn failures(processes: &[ProcessOutcome], checks: &Checks) -> Vec<Failure> {
    let mut failed = Vec::new();
    for p in processes {
        let name = describe(p);
        if checks.fail_on_leak && p.verdict.leaking {
            failed.push(Failure {
                pid: p.pid,
                check: "leak".into(),
                reason: format!("{name} leaks: {}{}", p.verdict.reason, top_site_note(p)),
            });
        }
        if let Some(max) = checks.max_heap_bytes
            && p.peak_heap_bytes > max
        {
            failed.push(Failure {
                pid: p.pid,
                check: "max_heap".into(),
                reason: format!(
                    "{name}: heap peaked at {}, over --max-heap {}",
                    format::bytes(p.peak_heap_bytes),
                    format::bytes(max)
                ),
            });
        }
        if let Some(max) = checks.max_growth_bytes_per_second
            && p.verdict.kind != VerdictKind::TooShort
            && p.growth_bytes_per_second > max
        {
            failed.push(Failure {
                pid: p.pid,
                check: "max_growth".into(),
                reason: format!(
                    "{name}: heap grew at {} after the warm-up, over --max-growth {}",
                    format::rate_per_minute(p.growth_bytes_per_second),
                    format::rate_per_minute(max)
                ),
            });
        }
    }
    failed
}

fn top_site_note(p: &ProcessOutcome) -> String {
    p.growing_sites.first().map_or(String::new(), |s| {
        format!(
            "; most growth at {} ({}:{}, {})",
            s.function,
            s.file,
            s.line,
            signed_bytes(s.growth_bytes as f64)
        )
    })
}

/// `pid 123 (python leaky.py)`.
pub fn describe(p: &ProcessOutcome) -> String {
    let command = if p.cmdline.is_empty() {
        &p.comm
    } else {
        &p.cmdline
    };
    format!("pid {} ({})", p.pid, shorten(command, 60))
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// The summary as people read it on stderr.
pub fn render_text(summary: &RunSummary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let status = summary
        .exit_status
        .map_or(String::new(), |s| format!(", exit status {s}"));
    let _ = writeln!(
        out,
        "pymem: {} — {}{status}, {} Python process{} ({}, warm-up {})",
        summary.target,
        format::duration(summary.duration_seconds),
        summary.processes.len(),
        if summary.processes.len() == 1 {
            ""
        } else {
            "es"
        },
        summary.source,
        summary.warmup,
    );
    if summary.processes.is_empty() {
        let _ = writeln!(out, "  no Python process was observed");
    }
    for p in &summary.processes {
        let _ = writeln!(
            out,
            "\n{} Python {}, accounting {}, observed {}",
            describe(p),
            p.python_version,
            serde_json::to_value(p.accounting)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            format::duration(p.last_seen_seconds - p.first_seen_seconds),
        );
        let _ = writeln!(
            out,
            "  heap     peak {} ({}), final {}",
            format::bytes(p.peak_heap_bytes),
            breakdown(&p.peak_heap),
            format::bytes(p.final_heap_bytes),
        );
        let _ = writeln!(
            out,
            "  rss      peak {}, final {}",
            format::bytes(p.peak_rss_bytes),
            format::bytes(p.final_rss_bytes)
        );
        let _ = writeln!(
            out,
            "  growth   {} after the warm-up ({:.0}-{:.0} s, R² {:.2})",
            format::rate_per_minute(p.growth_bytes_per_second),
            p.judged_from_seconds,
            p.judged_to_seconds,
            p.growth_fit
        );
        let label = match p.verdict.kind {
            VerdictKind::Leak => "LEAK",
            VerdictKind::Plateau => "plateau",
            VerdictKind::Churn => "churn",
            VerdictKind::Flat => "no leak",
            VerdictKind::TooShort => "no verdict",
        };
        let _ = writeln!(out, "  verdict  {label}: {}", p.verdict.reason);
        if !p.growing_sites.is_empty() {
            let _ = writeln!(out, "  growing sites (live bytes since the warm-up):");
            for s in p.growing_sites.iter().take(5) {
                let _ = writeln!(
                    out,
                    "    {:>11}  {} {}:{}",
                    signed_bytes(s.growth_bytes as f64),
                    s.function,
                    s.file,
                    s.line
                );
            }
        }
        if !p.growing_types.is_empty() {
            let _ = writeln!(out, "  growing types (object census):");
            for t in p.growing_types.iter().take(5) {
                let _ = writeln!(
                    out,
                    "    {:>11}  {:+} {}",
                    signed_bytes(t.bytes_delta as f64),
                    t.count_delta,
                    t.type_name
                );
            }
        } else if let Some(note) = &p.types_note {
            let _ = writeln!(out, "  types    {note}");
        }
    }
    for failure in &summary.failures {
        let _ = writeln!(out, "\npymem: check failed: {}", failure.reason);
    }
    out
}

fn breakdown(heap: &HeapBreakdown) -> String {
    let parts: Vec<String> = [
        ("arena", heap.arena_bytes),
        ("raw", heap.raw_bytes),
        ("extension", heap.extension_bytes),
        ("syscall", heap.syscall_bytes),
        ("before attach", heap.before_attach_bytes),
    ]
    .into_iter()
    .filter(|(_, bytes)| *bytes > 0)
    .map(|(name, bytes)| format!("{name} {}", format::bytes(bytes)))
    .collect();
    if parts.is_empty() {
        "empty".to_string()
    } else {
        parts.join(", ")
    }
}

/// Growing sites worth an annotation: at least this share of the
/// process's site growth.
const ANNOTATED_SHARE: f64 = 0.1;
const ANNOTATED_SITES: usize = 3;

/// GitHub Actions workflow commands for the failed checks: an `::error`
/// at each line that holds a good share of a leaking process's growth
/// (paths relative to `cwd` when under it, as the checkout's are), and one
/// without a line for any other failure.
pub fn github_annotations(summary: &RunSummary, cwd: &std::path::Path) -> String {
    let mut out = String::new();
    for failure in &summary.failures {
        let process = summary.processes.iter().find(|p| p.pid == failure.pid);
        let sites: Vec<&SiteGrowth> = match (failure.check.as_str(), process) {
            ("leak", Some(p)) => {
                let total: i64 = p.growing_sites.iter().map(|s| s.growth_bytes).sum();
                p.growing_sites
                    .iter()
                    .filter(|s| {
                        s.line > 0 && s.growth_bytes as f64 >= total as f64 * ANNOTATED_SHARE
                    })
                    .take(ANNOTATED_SITES)
                    .collect()
            }
            _ => Vec::new(),
        };
        if sites.is_empty() {
            out.push_str(&format!(
                "::error title={}::{}\n",
                escape_property("pymem: memory check failed"),
                escape_data(&failure.reason)
            ));
            continue;
        }
        for site in sites {
            let file = std::path::Path::new(&site.file);
            let file = file.strip_prefix(cwd).unwrap_or(file);
            let message = format!(
                "memory leak: {} holds {} more after the warm-up in {}: {}",
                site.function,
                signed_bytes(site.growth_bytes as f64),
                process.map(describe).unwrap_or_default(),
                process.map_or(failure.reason.as_str(), |p| p.verdict.reason.as_str()),
            );
            out.push_str(&format!(
                "::error file={},line={},title={}::{}\n",
                escape_property(&file.to_string_lossy()),
                site.line,
                escape_property("pymem: memory leak"),
                escape_data(&message)
            ));
        }
    }
    out
}

/// The escapes of a workflow command's message.
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// The escapes of a workflow command's property value.
fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests;
