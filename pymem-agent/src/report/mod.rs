//! The HTML report of a run or a recording: one self-contained file (inline
//! CSS, SVG and a little JavaScript; a Content-Security-Policy that forbids
//! every fetch), readable on light and dark pages. Per process: the heap
//! over time stacked by source beside the RSS, with the judged window (the
//! leak window when it leaks) marked; the growing sites as a table and the
//! live sites as a flame graph; the growing types; the process's metadata.
mod chart;

use std::fmt::Write as _;

use crate::{
    format,
    recording::{
        RunSummary,
        summary::{ProcessOutcome, VerdictKind, describe},
    },
    sites::flamegraph,
};

/// The whole page.
pub fn html(summary: &RunSummary) -> String {
    let mut page = String::with_capacity(64 << 10);
    let title = format!("pymem report: {}", summary.target);
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="color-scheme" content="light dark">
<title>{title}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{failures}
</header>
"#,
        title = escape(&title),
        meta = escape(&run_meta(summary)),
        failures = failures(summary),
    );
    if summary.processes.is_empty() {
        page.push_str("<p>No Python process was observed.</p>\n");
    }
    for (index, process) in summary.processes.iter().enumerate() {
        process_section(&mut page, index, process);
    }
    let _ = write!(
        page,
        "<footer>Written by pymem {}. Heap: pymalloc arenas, raw-domain blocks, extension buffers and syscall-accounted memory, from the kernel's counters.</footer>\n<script>{SCRIPT}</script>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    page
}

fn run_meta(summary: &RunSummary) -> String {
    let mut meta = format!(
        "{} · {} · warm-up {}",
        format::duration(summary.duration_seconds),
        summary.source,
        summary.warmup
    );
    if let Some(status) = summary.exit_status {
        let _ = write!(meta, " · exit status {status}");
    }
    let checks = &summary.checks;
    let mut asked = Vec::new();
    if checks.fail_on_leak {
        asked.push("--fail-on-leak".to_string());
    }
    if let Some(max) = checks.max_heap_bytes {
        asked.push(format!("--max-heap {}", format::bytes(max)));
    }
    if let Some(max) = checks.max_growth_bytes_per_second {
        asked.push(format!("--max-growth {}", format::rate_per_minute(max)));
    }
    if !asked.is_empty() {
        let _ = write!(meta, " · checks {}", asked.join(" "));
    }
    meta
}

fn failures(summary: &RunSummary) -> String {
    if summary.failures.is_empty() {
        let passed = if summary.checks == Default::default() {
            "no checks asked for"
        } else {
            "every check passed"
        };
        return format!("<p class=\"banner pass\">{passed}</p>");
    }
    let mut out = String::from("<div class=\"banner fail\"><strong>Check failed</strong><ul>");
    for failure in &summary.failures {
        let _ = write!(out, "<li>{}</li>", escape(&failure.reason));
    }
    out.push_str("</ul></div>");
    out
}

fn process_section(page: &mut String, index: usize, p: &ProcessOutcome) {
    let (badge, label) = match p.verdict.kind {
        VerdictKind::Leak => ("bad", "leak"),
        VerdictKind::Plateau => ("ok", "plateau"),
        VerdictKind::Churn => ("ok", "churn"),
        VerdictKind::Flat => ("ok", "no leak"),
        VerdictKind::TooShort => ("unknown", "no verdict"),
    };
    let _ = write!(
        page,
        r#"<section class="process" id="pid-{pid}">
<h2>{name} <span class="badge {badge}">{label}</span></h2>
<p class="verdict">{reason}</p>
<div class="figures">
{figures}
</div>
<div class="charts">
<figure><figcaption>Heap by source</figcaption>{heap}</figure>
<figure><figcaption>Resident set size (RSS) and heap</figcaption>{rss}</figure>
</div>
<p class="readout" id="readout-{index}">Point at a chart for the figures at that time.</p>
"#,
        pid = p.pid,
        name = escape(&describe(p)),
        reason = escape(&p.verdict.reason),
        figures = figures(p),
        heap = chart::heap(p, index),
        rss = chart::rss(p, index),
    );
    let _ = writeln!(
        page,
        "<script type=\"application/json\" class=\"samples\" data-chart=\"{index}\">{}</script>",
        samples_json(p)
    );
    sites_table(page, p);
    flame_graph(page, p);
    types_table(page, p);
    metadata(page, p);
    page.push_str("</section>\n");
}

fn figures(p: &ProcessOutcome) -> String {
    let figure = |name: &str, value: String| {
        format!(
            "<div class=\"figure\"><span>{}</span><strong>{}</strong></div>",
            escape(name),
            escape(&value)
        )
    };
    [
        figure("peak heap", format::bytes(p.peak_heap_bytes)),
        figure("final heap", format::bytes(p.final_heap_bytes)),
        figure("peak RSS", format::bytes(p.peak_rss_bytes)),
        figure(
            "growth after warm-up",
            format::rate_per_minute(p.growth_bytes_per_second),
        ),
        figure("fit (R²)", format!("{:.2}", p.growth_fit)),
        figure(
            "observed",
            format::duration(p.last_seen_seconds - p.first_seen_seconds),
        ),
    ]
    .join("\n")
}

/// The samples for the readout script: [t, heap, rss, arena, raw,
/// extension, syscall, before attach].
fn samples_json(p: &ProcessOutcome) -> String {
    let rows: Vec<[f64; 8]> = p
        .samples
        .iter()
        .map(|s| {
            [
                (s.t * 100.0).round() / 100.0,
                s.heap_bytes as f64,
                s.rss_bytes as f64,
                s.heap.arena_bytes as f64,
                s.heap.raw_bytes as f64,
                s.heap.extension_bytes as f64,
                s.heap.syscall_bytes as f64,
                s.heap.before_attach_bytes as f64,
            ]
        })
        .collect();
    // JSON inside a script element: `<` escaped so that no text closes it.
    serde_json::to_string(&rows)
        .unwrap_or_else(|_| "[]".to_string())
        .replace('<', "\\u003c")
}

fn sites_table(page: &mut String, p: &ProcessOutcome) {
    page.push_str("<h3>Growing allocation sites</h3>\n");
    if p.growing_sites.is_empty() {
        page.push_str("<p class=\"note\">No site's live bytes grew after the warm-up.</p>\n");
        return;
    }
    page.push_str("<table class=\"sites\"><thead><tr><th class=\"num\">growth</th><th class=\"num\">live</th><th>function</th><th>line</th></tr></thead><tbody>\n");
    for s in &p.growing_sites {
        let _ = writeln!(
            page,
            "<tr><td class=\"num\">+{}</td><td class=\"num\">{}</td><td><code>{}</code></td><td><code>{}:{}</code></td></tr>",
            format::bytes(s.growth_bytes.max(0) as u64),
            format::bytes(s.bytes),
            escape(&s.function),
            escape(&s.file),
            s.line
        );
    }
    page.push_str("</tbody></table>\n");
}

fn flame_graph(page: &mut String, p: &ProcessOutcome) {
    page.push_str("<h3>Live bytes by stack (flame graph)</h3>\n");
    let title = format!("{}: live bytes by allocation site", describe(p));
    match flamegraph::render_svg(&p.final_sites, &title) {
        Ok(svg) => {
            let svg = String::from_utf8_lossy(&svg);
            let _ = writeln!(
                page,
                "<div class=\"flame\">{}</div><p class=\"note\">Widths are live bytes at the end; point at a frame for its figures.</p>",
                inline_svg(&svg)
            );
        }
        Err(e) => {
            let _ = writeln!(
                page,
                "<p class=\"note\">No flame graph: {}.</p>",
                escape(&e.to_string())
            );
        }
    }
}

/// inferno's standalone SVG made an inline, static element: no XML prolog
/// or doctype, no script (its handlers would clash between processes and
/// the page's policy forbids them), no style of its own (it would apply to
/// the whole page), and a width that follows the page.
fn inline_svg(svg: &str) -> String {
    let start = svg.find("<svg").unwrap_or(0);
    let mut svg = svg[start..].to_string();
    for (open, close) in [("<script", "</script>"), ("<style", "</style>")] {
        while let Some(from) = svg.find(open) {
            let Some(to) = svg[from..].find(close) else {
                break;
            };
            svg.replace_range(from..from + to + close.len(), "");
        }
    }
    for handler in [
        " onload=\"",
        " onclick=\"",
        " onmouseover=\"",
        " onmouseout=\"",
    ] {
        while let Some(from) = svg.find(handler) {
            let value = from + handler.len();
            let Some(end) = svg[value..].find('"') else {
                break;
            };
            svg.replace_range(from..value + end + 1, "");
        }
    }
    // Only the outer element's size: the frames' own <svg> keeps its width.
    if let Some(tag_end) = svg.find('>') {
        let tag = svg[..tag_end]
            .replacen(" width=\"1200\"", " width=\"100%\"", 1)
            .replacen(" height=\"", " data-height=\"", 1);
        svg.replace_range(..tag_end, &tag);
    }
    svg
}

fn types_table(page: &mut String, p: &ProcessOutcome) {
    page.push_str("<h3>Growing types (object census)</h3>\n");
    if p.growing_types.is_empty() {
        let note = p
            .types_note
            .clone()
            .unwrap_or_else(|| "no type grew after the warm-up".to_string());
        let _ = writeln!(page, "<p class=\"note\">{}.</p>", escape(&note));
        return;
    }
    page.push_str("<table class=\"types\"><thead><tr><th class=\"num\">bytes growth</th><th class=\"num\">count growth</th><th class=\"num\">bytes</th><th class=\"num\">count</th><th>type</th></tr></thead><tbody>\n");
    for t in &p.growing_types {
        let _ = writeln!(
            page,
            "<tr><td class=\"num\">+{}</td><td class=\"num\">{:+}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
            format::bytes(t.bytes_delta.max(0) as u64),
            t.count_delta,
            format::bytes(t.bytes),
            t.count,
            escape(&t.type_name)
        );
    }
    page.push_str("</tbody></table>\n");
}

fn metadata(page: &mut String, p: &ProcessOutcome) {
    let name = |v: &dyn erased::Named| v.name();
    let rows = [
        ("pid", p.pid.to_string()),
        ("command", p.cmdline.clone()),
        ("Python", p.python_version.clone()),
        ("interpreter", p.binary.clone()),
        ("accounting", name(&p.accounting)),
        ("heap baseline", name(&p.heap_baseline)),
        (
            "observed",
            format!(
                "{:.1}-{:.1} s into the run",
                p.first_seen_seconds, p.last_seen_seconds
            ),
        ),
        (
            "judged window",
            format!(
                "{:.1}-{:.1} s (after the warm-up)",
                p.judged_from_seconds, p.judged_to_seconds
            ),
        ),
    ];
    page.push_str("<h3>Process</h3>\n<table class=\"metadata\"><tbody>\n");
    for (key, value) in rows {
        let _ = writeln!(
            page,
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            escape(key),
            escape(&value)
        );
    }
    page.push_str("</tbody></table>\n");
}

/// The snake_case names the JSON gives enums.
mod erased {
    pub trait Named {
        fn name(&self) -> String;
    }
    impl<T: serde::Serialize> Named for T {
        fn name(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }
    }
}

/// Text for HTML element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { --bg:#ffffff; --fg:#1d2329; --muted:#5b6570; --panel:#f4f6f8; --grid:#d9dee3;
  --arena:#3b7dd8; --raw:#e08a1e; --extension:#8c5cc7; --syscall:#2e9e6b; --before:#9aa5b1;
  --rss:#c2410c; --heapline:#1d2329; --window:#3b7dd8; --leak:#d7263d; --ok:#1f883d; --unknown:#8a8f98; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#0f1419; --fg:#e6e9ec; --muted:#9aa5b1; --panel:#1a2129; --grid:#2c3540;
    --arena:#6aa6ff; --raw:#ffb057; --extension:#b794f4; --syscall:#4fd18b; --before:#6b7785;
    --rss:#ff8a5b; --heapline:#e6e9ec; --window:#6aa6ff; --leak:#ff5c6c; --ok:#3fb950; --unknown:#9aa5b1; }
}
* { box-sizing: border-box; }
body { margin:0 auto; max-width:1280px; padding:24px; background:var(--bg); color:var(--fg);
  font:15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size:22px; margin:0 0 4px; word-break:break-all; }
h2 { font-size:18px; margin:0 0 6px; word-break:break-all; }
h3 { font-size:15px; margin:22px 0 8px; }
code { font:13px ui-monospace, "SFMono-Regular", Menlo, monospace; word-break:break-all; }
.meta, .note, footer, .readout { color:var(--muted); }
.banner { padding:10px 14px; border-radius:6px; margin:12px 0; border:1px solid; }
.banner.fail { border-color:var(--leak); color:var(--leak); }
.banner.fail ul { margin:6px 0 0; padding-left:20px; color:var(--fg); }
.banner.pass { border-color:var(--ok); color:var(--ok); }
.process { background:var(--panel); border-radius:10px; padding:18px 20px; margin:20px 0; }
.badge { font-size:12px; padding:2px 8px; border-radius:999px; color:#fff; vertical-align:middle; }
.badge.bad { background:var(--leak); } .badge.ok { background:var(--ok); } .badge.unknown { background:var(--unknown); }
.figures { display:flex; flex-wrap:wrap; gap:10px; margin:10px 0; }
.figure { background:var(--bg); border-radius:8px; padding:8px 12px; min-width:140px; }
.figure span { display:block; font-size:12px; color:var(--muted); }
.figure strong { font-size:18px; }
.charts { display:grid; grid-template-columns:repeat(auto-fit, minmax(420px, 1fr)); gap:14px; }
figure { margin:0; background:var(--bg); border-radius:8px; padding:8px; }
figcaption { font-size:13px; color:var(--muted); margin:0 0 4px 4px; }
svg.chart { width:100%; height:auto; display:block; }
svg.chart text { fill:var(--muted); font-size:11px; font-family:system-ui, sans-serif; }
svg.chart .grid { stroke:var(--grid); stroke-width:1; }
svg.chart .axis { stroke:var(--muted); stroke-width:1; }
.src-arena { fill:var(--arena); } .src-raw { fill:var(--raw); } .src-extension { fill:var(--extension); }
.src-syscall { fill:var(--syscall); } .src-before { fill:var(--before); }
.key-arena { background:var(--arena); } .key-raw { background:var(--raw); } .key-extension { background:var(--extension); }
.key-syscall { background:var(--syscall); } .key-before { background:var(--before); } .key-rss { background:var(--rss); }
.key-heap { background:var(--heapline); }
svg.chart .area { fill-opacity:0.85; }
svg.chart .rss-line { fill:none; stroke:var(--rss); stroke-width:2; }
svg.chart .heap-line { fill:none; stroke:var(--heapline); stroke-width:1.5; stroke-dasharray:4 3; }
svg.chart .window { fill:var(--window); fill-opacity:0.08; stroke:var(--window); stroke-opacity:0.5; stroke-dasharray:3 3; }
svg.chart .window.leak { fill:var(--leak); fill-opacity:0.12; stroke:var(--leak); }
svg.chart text.window-label { fill:var(--window); font-weight:600; }
svg.chart text.window-label.leak { fill:var(--leak); }
svg.chart .cursor { stroke:var(--fg); stroke-width:1; stroke-opacity:0.6; }
.legend { display:flex; flex-wrap:wrap; gap:12px; font-size:12px; color:var(--muted); margin:4px 4px 0; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; vertical-align:-1px; }
table { border-collapse:collapse; width:100%; background:var(--bg); border-radius:8px; overflow:hidden; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--grid); vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; }
.num { text-align:right; white-space:nowrap; font-variant-numeric:tabular-nums; }
table.metadata th { width:160px; }
.flame { background:var(--bg); border-radius:8px; padding:6px; overflow:hidden; }
.flame svg { width:100%; height:auto; display:block; }
.flame > svg > rect:first-of-type { fill:var(--bg); }
.flame text { font:12px ui-monospace, Menlo, monospace; fill:#000; }
.flame #title { text-anchor:middle; font-size:15px; fill:var(--fg); }
.flame #details, .flame #unzoom, .flame #search, .flame #matched { display:none; }
.flame #frames > g:hover rect { stroke:var(--fg); stroke-width:1; }
footer { margin:30px 0 10px; font-size:12px; }
"#;

/// The readout under the charts: the figures of the sample nearest the
/// pointer, and a cursor line on both charts. The page is complete
/// without it.
const SCRIPT: &str = r#"
(function () {
  "use strict";
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }
  document.querySelectorAll("script.samples").forEach(function (node) {
    var index = node.getAttribute("data-chart");
    var rows = JSON.parse(node.textContent);
    var readout = document.getElementById("readout-" + index);
    var charts = document.querySelectorAll('svg.chart[data-chart="' + index + '"]');
    charts.forEach(function (svg) {
      svg.addEventListener("mousemove", function (event) {
        if (!rows.length) return;
        var point = svg.createSVGPoint();
        point.x = event.clientX; point.y = event.clientY;
        var local = point.matrixTransform(svg.getScreenCTM().inverse());
        var x0 = +svg.getAttribute("data-x0"), x1 = +svg.getAttribute("data-x1");
        var t0 = +svg.getAttribute("data-t0"), t1 = +svg.getAttribute("data-t1");
        var t = t0 + (local.x - x0) / (x1 - x0) * (t1 - t0);
        var best = rows[0];
        rows.forEach(function (row) { if (Math.abs(row[0] - t) < Math.abs(best[0] - t)) best = row; });
        var x = x0 + (best[0] - t0) / ((t1 - t0) || 1) * (x1 - x0);
        charts.forEach(function (other) {
          var cursor = other.querySelector(".cursor");
          cursor.setAttribute("x1", x); cursor.setAttribute("x2", x);
          cursor.setAttribute("visibility", "visible");
        });
        readout.textContent = best[0].toFixed(1) + " s: heap " + bytes(best[1]) +
          " (arena " + bytes(best[3]) + ", raw " + bytes(best[4]) + ", extension " + bytes(best[5]) +
          ", syscall " + bytes(best[6]) + (best[7] ? ", before attach " + bytes(best[7]) : "") +
          "), RSS " + bytes(best[2]);
      });
    });
  });
  document.documentElement.setAttribute("data-rendered", "true");
})();
"#;

#[cfg(test)]
mod tests;
