//! The results of `bench peers`: every run as JSON, and from that JSON (so
//! that `cargo xtask perf-table` can render it again) the Markdown tables,
//! the SVG bar chart and the README's performance section.
use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{Plan, Run, Tool, Workload, found::Found};
use crate::{bench::median, support, workspace};

const README_START: &str = "<!-- peers-table:start -->";
const README_END: &str = "<!-- peers-table:end -->";

/// Spread of a sample: max / min - 1, in percent.
pub fn spread_percent(values: &[f64]) -> f64 {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    (max / min - 1.0) * 100.0
}

/// Median of `with` over median of `without`.
pub fn ratio(with: &[f64], without: &[f64]) -> f64 {
    median(with) / median(without)
}

/// A 95 % bootstrap interval of [`ratio`]: both samples resampled with
/// replacement, 2,000 times (a fixed seed, so a report renders the same).
/// On a machine whose runs without a tool spread by tens of percent, this
/// says which ratios the run can tell from 1.00× at all.
pub fn ratio_interval(with: &[f64], without: &[f64]) -> (f64, f64) {
    const RESAMPLES: usize = 2000;
    if with.is_empty() || without.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        // xorshift64*: enough for resampling indices.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let mut ratios: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let a: Vec<f64> = (0..with.len()).map(|_| with[next(with.len())]).collect();
            let b: Vec<f64> = (0..without.len())
                .map(|_| without[next(without.len())])
                .collect();
            ratio(&a, &b)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (
        ratios[RESAMPLES * 25 / 1000],
        ratios[RESAMPLES * 975 / 1000 - 1],
    )
}

fn run_json(run: &Run) -> Value {
    json!({
        "wall_seconds": run.wall,
        "cpu_seconds": run.cpu,
        "peak_rss_kib": run.peak_rss_kib,
        "load": run.load.as_ref().map(|l| l.to_json()),
        "agent": run.agent.as_ref().map(|a| json!({
            "cpu_percent": a.cpu_percent,
            "rss_kib": a.rss_kib,
            "peak_rss_kib": a.peak_rss_kib,
            "probe_hits": a.probe_hits,
            "probe_hits_during_work": a.probe_hits_during_work,
            "work_cpu_seconds": a.work_cpu_seconds,
            "accounting": a.accounting,
            "census_pause_seconds": a.census_pause_seconds,
        })),
        "found": run.found.as_ref().map(Found::to_json),
    })
}

pub fn results_json(
    plan: &Plan,
    runs: &[(Tool, Workload, Run)],
    leak_line: u32,
    python: &Path,
    seconds_per_probe_hit: Option<f64>,
) -> Value {
    let of = |tool: Tool, workload: Workload| -> Vec<&Run> {
        runs.iter()
            .filter(|(t, w, _)| *t == tool && *w == workload)
            .map(|(_, _, r)| r)
            .collect()
    };
    let values =
        |runs: &[&Run], f: &dyn Fn(&Run) -> f64| runs.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let mut workloads = Vec::new();
    for &workload in &plan.workloads {
        let base = of(Tool::None, workload);
        let base_cpu = values(&base, &|r| r.cpu);
        let base_wall = values(&base, &|r| r.wall);
        let base_rss = values(&base, &|r| r.peak_rss_kib);
        let mut tools = Vec::new();
        for &tool in &plan.tools {
            let these = of(tool, workload);
            let load = |f: &dyn Fn(&super::load::LoadResult) -> f64| {
                let v: Vec<f64> = these
                    .iter()
                    .filter_map(|r| r.load.as_ref().map(f))
                    .collect();
                (!v.is_empty()).then(|| median(&v))
            };
            // The median of a figure over the runs that have it.
            let agent = |f: &dyn Fn(&super::AgentCost) -> Option<f64>| {
                let v: Vec<f64> = these
                    .iter()
                    .filter_map(|r| r.agent.as_ref().and_then(f))
                    .collect();
                (!v.is_empty()).then(|| median(&v))
            };
            let cpu = values(&these, &|r| r.cpu);
            let (cpu_low, cpu_high) = ratio_interval(&cpu, &base_cpu);
            // The share of each run's CPU its probe hits in the work took,
            // at the calibrated price.
            let probe_cpu_percent = agent(&|a| {
                let hits = a.probe_hits_during_work? as f64;
                Some(hits * seconds_per_probe_hit? / a.work_cpu_seconds * 100.0)
            });
            tools.push(json!({
                "tool": tool.id(),
                "label": tool.label(),
                "needs": tool.needs(),
                "cpu_ratio": ratio(&cpu, &base_cpu),
                "cpu_ratio_interval": [cpu_low, cpu_high],
                "wall_ratio": ratio(&values(&these, &|r| r.wall), &base_wall),
                "extra_peak_rss_mib": (median(&values(&these, &|r| r.peak_rss_kib)) - median(&base_rss)) / 1024.0,
                "median_cpu_seconds": median(&values(&these, &|r| r.cpu)),
                "median_wall_seconds": median(&values(&these, &|r| r.wall)),
                "requests_per_second": load(&|l| l.requests_per_second()),
                "p50_ms": load(&|l| l.p50_ms),
                "p99_ms": load(&|l| l.p99_ms),
                "agent_cpu_percent": agent(&|a| Some(a.cpu_percent)),
                "agent_rss_mib": agent(&|a| Some(a.rss_kib as f64 / 1024.0)),
                "agent_peak_rss_mib": agent(&|a| Some(a.peak_rss_kib as f64 / 1024.0)),
                "probe_hits": agent(&|a| a.probe_hits.map(|h| h as f64)),
                "probe_hits_during_work": agent(&|a| a.probe_hits_during_work.map(|h| h as f64)),
                "probe_cpu_percent": probe_cpu_percent,
                "census_pause_seconds": agent(&|a| a.census_pause_seconds),
                "accounting": these.iter().rev().find_map(|r| r.agent.as_ref()?.accounting.clone()),
                // The last run's findings (each run's are in `runs`).
                "found": these.iter().rev().find_map(|r| r.found.as_ref().map(Found::to_json)),
                "runs": these.iter().map(|r| run_json(r)).collect::<Vec<_>>(),
            }));
        }
        workloads.push(json!({
            "workload": workload.id(),
            "noise_cpu_percent": spread_percent(&base_cpu),
            "noise_wall_percent": spread_percent(&base_wall),
            "tools": tools,
        }));
    }
    json!({
        "benchmark": "peers",
        "rounds": plan.rounds,
        "quick": plan.quick,
        "scale": plan.scale,
        "flask_load": {"clients": plan.load_clients, "seconds": plan.load_seconds},
        "python": python,
        "seconds_per_probe_hit": seconds_per_probe_hit,
        "leak": {"file": "bench/peers/leak.py", "line": leak_line,
                 "type": super::found::LEAK_TYPE, "variable": super::found::LEAK_VARIABLE},

        "workloads": workloads,
    })
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn tools_of(json: &Value) -> Vec<(String, String, String)> {
    json["workloads"][0]["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["tool"].as_str().unwrap_or("?").to_owned(),
                t["label"].as_str().unwrap_or("?").to_owned(),
                t["needs"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn workload_ids(json: &Value) -> Vec<String> {
    json["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["workload"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn cell<'a>(json: &'a Value, workload: &str, tool: &str) -> &'a Value {
    json["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["workload"] == workload))
        .and_then(|w| w["tools"].as_array())
        .and_then(|ts| ts.iter().find(|t| t["tool"] == tool))
        .unwrap_or(&Value::Null)
}

/// A tools × workloads table of one figure.
fn matrix(json: &Value, title: &str, show: &dyn Fn(&Value) -> String, with_noise: bool) -> String {
    let workloads = workload_ids(json);
    let mut md = format!("| {title} |");
    for w in &workloads {
        md += &format!(" {w} |");
    }
    md += "\n|---|";
    md += &"---|".repeat(workloads.len());
    md.push('\n');
    for (tool, label, _) in tools_of(json) {
        if tool == "none" {
            continue;
        }
        md += &format!("| {label} |");
        for w in &workloads {
            md += &format!(" {} |", show(cell(json, w, &tool)));
        }
        md.push('\n');
    }
    if with_noise {
        md += "| *noise: no-tool spread (CPU / wall)* |";
        for w in json["workloads"].as_array().into_iter().flatten() {
            md += &format!(
                " {:.0} % / {:.0} % |",
                f(&w["noise_cpu_percent"]),
                f(&w["noise_wall_percent"])
            );
        }
        md.push('\n');
    }
    md
}

fn times(value: &Value) -> String {
    format!("{:.2}×", f(value))
}

/// The summary: CPU and wall slow-downs, what each tool needs, and what it
/// found on the leak. The README shows this part.
pub fn summary(json: &Value) -> String {
    let mut md = format!(
        "Median of {} interleaved rounds{}, pyenv 3.11.7; ratios are the median with the \
         tool over the median without (1.00× = no slow-down). Flask: per request, from \
         {}-second closed-loop runs of {} clients.\n\n",
        json["rounds"],
        if json["quick"] == true {
            " (`--quick`: a third of the work)"
        } else {
            ""
        },
        json["flask_load"]["seconds"],
        json["flask_load"]["clients"],
    );
    md += "**CPU time of the target** (in brackets: a 95 % bootstrap interval of the ratio; \
           one that holds 1.00× cannot be told from no slow-down on this machine)\n\n";
    md += &matrix(
        json,
        "tool",
        &|c| {
            let interval = &c["cpu_ratio_interval"];
            let (low, high) = (f(&interval[0]), f(&interval[1]));
            if low.is_finite() && high.is_finite() {
                format!("{} ({low:.2}–{high:.2})", times(&c["cpu_ratio"]))
            } else {
                times(&c["cpu_ratio"])
            }
        },
        true,
    );
    md += "\n**Wall time**\n\n";
    md += &matrix(json, "tool", &|c| times(&c["wall_ratio"]), false);
    md += "\n**What it takes, and what it found on the leak** (`bench/peers/leak.py`: \
           `SessionRecord`s kept in the module-level `SESSIONS`), parsed from each tool's own output\n\n\
           | tool | needs | process | line | type | variable | its output said |\n|---|---|---|---|---|---|---|\n";
    for (tool, label, needs) in tools_of(json) {
        if tool == "none" {
            continue;
        }
        let found = &cell(json, "leak", &tool)["found"];
        let v = |k: &str| found[k].as_str().unwrap_or("–").to_owned();
        md += &format!(
            "| {label} | {needs} | {} | {} | {} | {} | {} |\n",
            v("process"),
            v("line"),
            v("type"),
            v("variable"),
            found["detail"].as_str().unwrap_or("–").replace('|', "/")
        );
    }
    md
}

pub fn markdown(json: &Value) -> String {
    let mut md = String::from("# pymem and its peers\n\n");
    md += &summary(json);
    md += "\n**Extra peak RSS of the target** (its own `ru_maxrss`, over no tool; pymem's \
           memory is in the agent, below)\n\n";
    md += &matrix(
        json,
        "tool",
        &|c| format!("{:+.1} MiB", f(&c["extra_peak_rss_mib"])),
        false,
    );
    md +=
        "\n**Flask service under load**\n\n| tool | requests/s | p50 | p99 |\n|---|---|---|---|\n";
    for (tool, label, _) in tools_of(json) {
        let c = cell(json, "flask_service", &tool);
        md += &format!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms |\n",
            f(&c["requests_per_second"]),
            f(&c["p50_ms"]),
            f(&c["p99_ms"])
        );
    }
    let per_hit = f(&json["seconds_per_probe_hit"]);
    md += &format!(
        "\n**The agent's own cost during pymem's runs** (medians: its CPU over the work, \
         RSS at the end, peak RSS; the workload's probe hits over its life and during the timed \
         work, each a trap into the kernel priced at {} by the calibration of `bench overhead`, \
         and that price of the work's hits as a share of the work's CPU time: what pymem's \
         probes took from the target, measured without the machine's noise; its accounting at \
         the end; and the pause of one object census taken after the work, with what a census \
         every minute would cost: that pause over 60 s)\n\n| workload | agent CPU (% of one core) | RSS | peak RSS | probe hits | in the work | probe time | accounting | census pause | a census a minute |\n|---|---|---|---|---|---|---|---|---|---|\n",
        if per_hit.is_finite() {
            format!("{:.1} µs a hit", per_hit * 1e6)
        } else {
            "– (not calibrated)".to_owned()
        }
    );
    for w in workload_ids(json) {
        let c = cell(json, &w, "pymem");
        let count = |v: &Value| {
            let n = f(v);
            if n.is_finite() {
                format!("{n:.0}")
            } else {
                "–".to_owned()
            }
        };
        let probe_time = f(&c["probe_cpu_percent"]);
        let pause = f(&c["census_pause_seconds"]);
        let (pause_text, per_minute) = if pause.is_finite() {
            (
                format!("{:.1} ms", pause * 1e3),
                format!("{:.3} %", pause / 60.0 * 100.0),
            )
        } else {
            ("–".to_owned(), "–".to_owned())
        };
        md += &format!(
            "| {w} | {:.2} % | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} | {pause_text} | {per_minute} |\n",
            f(&c["agent_cpu_percent"]),
            f(&c["agent_rss_mib"]),
            f(&c["agent_peak_rss_mib"]),
            count(&c["probe_hits"]),
            count(&c["probe_hits_during_work"]),
            if probe_time.is_finite() {
                format!("{probe_time:.2} %")
            } else {
                "–".to_owned()
            },
            c["accounting"].as_str().unwrap_or("–"),
        );
    }
    md += &format!(
        "\nIn-process CPU time counts the tools' own threads (memray's writer, ddtrace's \
         exporter); mprof samples from its parent process, which is not counted. The workload \
         starts timing after the tool is loaded (and, for pymem, once the agent has attached every \
         probe, its costly case). The peers ran for {:.0} s; the whole benchmark {:.0} s.\n",
        f(&json["peers_seconds"]),
        f(&json["total_seconds"]),
    );
    if !json["scaling"].is_null() {
        md += &scaling_markdown(&json["scaling"]);
    }
    md
}

fn scaling_markdown(scaling: &Value) -> String {
    let mut md = String::from(
        "\n## Scaling\n\nCatching up is the agent's start: observing each process and censusing each once for its heap baseline, paced to `--census-background-cpu` (25 % of one core). The CPU and RSS columns are measured after that.\n\n| Python processes | all observed after | baselines done after | catch-up CPU | agent CPU (% of one core) | RSS | peak RSS | new process observed after (median) |\n|---|---|---|---|---|---|---|---|\n",
    );
    let optional = |v: &Value, unit: &str| {
        v.as_f64()
            .map_or("–".to_owned(), |x| format!("{x:.1} {unit}"))
    };
    for s in scaling["processes"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.1} s | {} | {} | {:.2} % | {:.1} MiB | {:.1} MiB | {} |\n",
            s["label"].as_str().unwrap_or("?"),
            f(&s["seconds_until_all_observed"]),
            optional(&s["seconds_until_all_baselines"], "s"),
            optional(&s["catch_up_cpu_seconds"], "s"),
            f(&s["agent_cpu_percent"]),
            f(&s["agent_rss_kib_at_end"]) / 1024.0,
            f(&s["agent_peak_rss_kib"]) / 1024.0,
            s["new_process_observed_ms"]
                .as_f64()
                .map_or("–".to_owned(), |ms| format!("{ms:.0} ms")),
        );
    }
    md += "\n| heap | pause | copy | parse | census total | copied | agent peak RSS |\n|---|---|---|---|---|---|---|\n";
    for c in scaling["census"].as_array().into_iter().flatten() {
        md += &match c["error"].as_str() {
            Some(e) => format!("| ~{} MiB | failed: {e} | | | | | |\n", c["heap_mib"]),
            None => format!(
                "| ~{} MiB | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.0} MiB | {:.0} MiB |\n",
                c["heap_mib"],
                f(&c["pause_seconds"]),
                f(&c["copy_seconds"]),
                f(&c["parse_seconds"]),
                f(&c["total_seconds"]),
                f(&c["copied_bytes"]) / 1048576.0,
                f(&c["agent_peak_rss_kib"]) / 1024.0,
            ),
        };
    }
    md
}

/// Ratios at which the chart's scale has a line.
const SVG_TICKS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// Grouped bars: the CPU-time ratio of each tool on each workload, on a
/// log scale (tracemalloc's 50× and pymem's 1.01× on one chart), each bar
/// drawn from 1× (no slow-down) and labelled with its ratio.
pub fn svg(json: &Value) -> String {
    let tools: Vec<(String, String, String)> = tools_of(json)
        .into_iter()
        .filter(|(t, _, _)| t != "none")
        .collect();
    let workloads = workload_ids(json);
    let colors = [
        "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
    ];
    let ratios: Vec<Vec<f64>> = workloads
        .iter()
        .map(|w| {
            tools
                .iter()
                .map(|(t, _, _)| f(&cell(json, w, t)["cpu_ratio"]))
                .collect()
        })
        .collect();
    let finite = || {
        ratios
            .iter()
            .flatten()
            .copied()
            .filter(|r| r.is_finite() && *r > 0.0)
    };
    let largest = finite().fold(1.0_f64, f64::max);
    let smallest = finite().fold(1.0_f64, f64::min);
    let lo = SVG_TICKS
        .iter()
        .copied()
        .rev()
        .find(|t| *t <= smallest)
        .unwrap_or(SVG_TICKS[0]);
    let hi = SVG_TICKS
        .iter()
        .copied()
        .find(|t| *t >= largest && *t > 1.0)
        .unwrap_or(SVG_TICKS[SVG_TICKS.len() - 1]);
    let (left, top, height, bar, gap) = (50.0, 30.0, 300.0, 16.0, 30.0);
    let group = bar * tools.len() as f64 + gap;
    let width = left + group * workloads.len() as f64 + 260.0;
    let y = |r: f64| {
        let r = r.clamp(lo, hi);
        top + height - (r.ln() - lo.ln()) / (hi.ln() - lo.ln()) * height
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"{left}\" y=\"18\" font-size=\"13\">CPU time with the tool / without (median; log scale, bars from 1×)</text>\n",
        top + height + 50.0
    );
    for tick in SVG_TICKS.iter().copied().filter(|t| (lo..=hi).contains(t)) {
        let stroke = if tick == 1.0 { "#888" } else { "#ddd" };
        svg += &format!(
            "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{stroke}\"/><text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{tick}×</text>\n",
            left + group * workloads.len() as f64,
            y(tick),
            y(tick),
            left - 4.0,
            y(tick) + 4.0
        );
    }
    for (wi, w) in workloads.iter().enumerate() {
        let x0 = left + gap / 2.0 + group * wi as f64;
        for (ti, r) in ratios[wi].iter().enumerate() {
            if !r.is_finite() || *r <= 0.0 {
                continue;
            }
            let (from, to) = (y(1.0), y(*r));
            let x = x0 + bar * ti as f64;
            svg += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar}\" height=\"{:.1}\" fill=\"{}\"><title>{} {w}: {r:.2}×</title></rect>\n",
                from.min(to),
                (from - to).abs().max(1.0),
                colors[ti % colors.len()],
                tools[ti].1
            );
            // The ratio beside the bar's end, turned to fit its width.
            let label_y = if *r >= 1.0 { to - 3.0 } else { to + 3.0 };
            let anchor = if *r >= 1.0 { "start" } else { "end" };
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{label_y:.1}\" font-size=\"9\" text-anchor=\"{anchor}\" transform=\"rotate(-90 {:.1} {label_y:.1})\">{r:.2}</text>\n",
                x + bar / 2.0 + 3.0,
                x + bar / 2.0 + 3.0,
            );
        }
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.0}\" text-anchor=\"middle\">{w}</text>\n",
            x0 + bar * tools.len() as f64 / 2.0,
            top + height + 16.0
        );
    }
    for (ti, (_, label, _)) in tools.iter().enumerate() {
        let x = left + group * workloads.len() as f64 + 20.0;
        let ly = top + 14.0 * ti as f64;
        svg += &format!(
            "<rect x=\"{x:.0}\" y=\"{ly:.0}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{label}</text>\n",
            colors[ti % colors.len()],
            x + 14.0,
            ly + 9.0
        );
    }
    svg += "</svg>\n";
    svg
}

/// `cargo xtask perf-table`: README.md's performance section from
/// target/bench/peers.json.
pub fn update_readme() -> Result<()> {
    let path = workspace::target_dir().join("bench/peers.json");
    let json: Value = serde_json::from_str(&fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: run `cargo xtask bench peers` first",
            path.display()
        )
    })?)?;
    let readme = workspace::root().join("README.md");
    support::replace_between(
        &readme,
        "Performance",
        README_START,
        README_END,
        &format!(
            "{}\nFrom `cargo xtask bench peers` (kernel {}); the whole report, with peak RSS, \
             Flask latencies, the agent's own cost and the scaling runs, is \
             `target/bench/peers.md`.\n",
            summary(&json),
            json["kernel"].as_str().unwrap_or("?")
        ),
    )?;
    println!(
        "performance section: {} into {}",
        path.display(),
        readme.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_of_medians_and_spread_is_max_over_min() {
        assert_eq!(ratio(&[2.0, 4.0, 3.0], &[1.0, 1.5, 0.5]), 3.0);
        assert!((spread_percent(&[1.0, 1.2, 1.1]) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn the_ratio_interval_holds_the_ratio_and_narrows_with_less_noise() {
        // No noise: every resample gives the same ratio.
        assert_eq!(ratio_interval(&[2.0; 5], &[1.0; 5]), (2.0, 2.0));
        let without = [0.38, 0.52, 0.68, 0.70, 0.60, 0.73, 0.41];
        let with = [0.60, 0.72, 0.40, 0.71, 0.57, 0.42, 0.52];
        let (low, high) = ratio_interval(&with, &without);
        let point = ratio(&with, &without);
        assert!(low < point && point < high, "{low} {point} {high}");
        // Runs this noisy cannot tell 1.00× from a 10 % slow-down.
        assert!(low < 0.9 && high > 1.1, "{low} {high}");
        let tight: Vec<f64> = without.iter().map(|v| 0.6 + (v - 0.6) / 100.0).collect();
        let (low, high) = ratio_interval(&tight, &tight);
        assert!(low > 0.99 && high < 1.01, "{low} {high}");
    }

    #[test]
    fn the_cpu_table_shows_the_interval_beside_the_ratio() {
        let json = json!({
            "rounds": 1, "quick": false, "flask_load": {"seconds": 3, "clients": 2},
            "workloads": [{"workload": "alloc_heavy", "noise_cpu_percent": 5.0, "noise_wall_percent": 7.0,
                "tools": [
                    {"tool": "none", "label": "no tool", "needs": "–", "cpu_ratio": 1.0, "wall_ratio": 1.0},
                    {"tool": "pymem", "label": "pymem", "needs": "neither", "cpu_ratio": 1.01,
                     "cpu_ratio_interval": [0.93, 1.12], "wall_ratio": 1.02}
                ]}]
        });
        assert!(summary(&json).contains("| pymem | 1.01× (0.93–1.12) |"));
    }

    #[test]
    fn summary_fills_found_columns_from_the_results() {
        let json = json!({
            "rounds": 1, "quick": false, "flask_load": {"seconds": 3, "clients": 2},
            "workloads": [{"workload": "leak", "noise_cpu_percent": 5.0, "noise_wall_percent": 7.0,
                "tools": [
                    {"tool": "none", "label": "no tool", "needs": "–", "cpu_ratio": 1.0, "wall_ratio": 1.0},
                    {"tool": "pymem", "label": "pymem", "needs": "neither", "cpu_ratio": 1.01, "wall_ratio": 1.02,
                     "found": {"process": "yes", "line": "yes", "type": "no", "variable": "yes", "detail": "a|b"}}
                ]}]
        });
        let md = summary(&json);
        assert!(md.contains("| pymem | 1.01× |"), "{md}");
        assert!(
            md.contains("| pymem | neither | yes | yes | no | yes | a/b |"),
            "{md}"
        );
        assert!(md.contains("5 % / 7 %"), "{md}");
    }

    #[test]
    fn svg_scale_shows_small_and_large_ratios_together() {
        let json = json!({
            "workloads": [{"workload": "alloc_heavy", "tools": [
                {"tool": "none", "label": "no tool", "cpu_ratio": 1.0},
                {"tool": "pymem", "label": "pymem", "cpu_ratio": 1.02},
                {"tool": "tracemalloc", "label": "tracemalloc", "cpu_ratio": 54.0},
                {"tool": "mprof", "label": "mprof", "cpu_ratio": 0.9}
            ]}]
        });
        let svg = svg(&json);
        let height_of = |label: &str| -> f64 {
            let rect = svg
                .lines()
                .find(|l| l.starts_with("<rect") && l.contains(&format!("<title>{label} ")))
                .unwrap_or_else(|| panic!("no bar of {label} in\n{svg}"));
            let at = rect.find("height=\"").unwrap() + 8;
            rect[at..].split('"').next().unwrap().parse().unwrap()
        };
        // 300 px from 0.5× to 100×: 54× is most of it, 1.02× still a bar.
        assert!(height_of("tracemalloc") > 200.0, "{svg}");
        assert!(height_of("pymem") >= 1.0, "{svg}");
        assert!(height_of("mprof") > 5.0, "{svg}");
        for text in [">1.02<", ">54.00<", ">0.90<", ">100×<", ">0.5×<"] {
            assert!(svg.contains(text), "{text} missing:\n{svg}");
        }
    }
}
