//! Rendering: `App` state in, one frame out. Default foreground and
//! background everywhere (readable on light and dark terminals), modest
//! accents, bold/reverse for emphasis and selection.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    symbols::Marker,
    text::{Line, Span},
    widgets::{
        Axis, Block, Cell, Chart, Dataset, GraphType, Paragraph, Row, Table, TableState, Wrap,
    },
};

use super::{
    app::{App, Sites, SortKey, Status, Types, View},
    text,
};
use crate::{
    census::{self, CensusReport},
    format,
    model::{Accounting, HeapBaseline, OomKill, ProcessInfo},
    sites::{self, Site},
};

/// Most cells the heap sparkline gets in the table.
const MAX_HISTORY_WIDTH: u16 = 30;
/// The command column keeps this many cells before the sparkline gets any.
const MIN_COMMAND_WIDTH: u16 = 20;
const COLUMN_SPACING: u16 = 1;
/// Widest the function column of the sites table gets; the location has
/// the rest.
const MAX_FUNCTION_WIDTH: u16 = 32;
/// Accents that read on both light and dark backgrounds.
const ALERT: Color = Color::Red;
const ACCENT: Color = Color::Magenta;

pub fn render(frame: &mut Frame, app: &App) {
    let banner_height = u16::from(!app.oom_kills.is_empty());
    let [header, banner, body, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banner_height),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(header_line(app), header);
    if let Some(latest) = app.oom_kills.first() {
        frame.render_widget(oom_banner(latest, app.oom_kills.len()), banner);
    }
    match app.view {
        View::List => render_table(frame, body, app),
        View::Detail(pid) => render_detail(frame, body, app, pid),
    }
    frame.render_widget(help_line(app), help);
}

fn header_line(app: &App) -> Line<'static> {
    let sep = || Span::raw(" │ ");
    let mut spans = vec![
        Span::raw("pymem top").bold(),
        sep(),
        Span::raw(format!("source: {}", app.source)),
        sep(),
        Span::raw(format!(
            "{}/{} processes",
            app.visible().len(),
            app.total_processes()
        )),
        sep(),
        Span::raw(format!(
            "sort: {} {}",
            app.sort.label(),
            sort_arrow(app.sort)
        )),
    ];
    if app.editing_filter || !app.filter.is_empty() {
        spans.push(sep());
        let cursor = if app.editing_filter { "▏" } else { "" };
        spans.push(Span::raw(format!("filter: {}{cursor}", app.filter)).bold());
    }
    match &app.status {
        Status::Live => {}
        Status::Waiting => {
            spans.push(sep());
            spans.push(Span::raw("waiting for data…"));
        }
        Status::Failed(error) => {
            spans.push(sep());
            spans.push(Span::raw(format!("error: {error}")).fg(ALERT).bold());
        }
    }
    Line::from(spans)
}

/// The latest OOM kill, in the alert colour, and how many more are kept.
fn oom_banner(latest: &OomKill, kept: usize) -> Line<'static> {
    let mut text = oom_kill_summary(latest, census::unix_seconds_now());
    if kept > 1 {
        text.push_str(&format!(" (+{} earlier: /api/v1/oom-kills)", kept - 1));
    }
    Line::from(text).fg(ALERT).bold()
}

/// One OOM kill in a line: when, which process, its heap against its
/// limit, its top site.
pub fn oom_kill_summary(kill: &OomKill, now: f64) -> String {
    let command = if kill.cmdline.is_empty() {
        kill.comm.clone()
    } else {
        text::short_command(&kill.cmdline)
    };
    let limit = kill.memory_limit.limit_bytes.map_or_else(
        || "no known limit".to_string(),
        |l| format!("limit {}", format::bytes(l)),
    );
    let top_site = kill.top_sites.first().map_or_else(
        || "no sites".to_string(),
        |site| format!("top site {}", sites::location(&site.file, site.line)),
    );
    format!(
        "OOM-killed {} ago: pid {} ({command}) heap {}, {limit}, {top_site}",
        format::duration(now - kill.killed_at),
        kill.pid,
        format::bytes(kill.heap_bytes),
    )
}

fn sort_arrow(sort: SortKey) -> &'static str {
    if sort.descending() { "▼" } else { "▲" }
}

/// The table's columns: title, the sort key it shows, right-aligned. ETA:
/// the time until the memory limit at the leak's growth rate.
const COLUMNS: [(&str, Option<SortKey>, bool); 9] = [
    ("PID", Some(SortKey::Pid), true),
    ("COMMAND", None, false),
    ("PYTHON", None, false),
    ("HEAP", Some(SortKey::Heap), true),
    ("RSS", Some(SortKey::Rss), true),
    ("GROWTH", Some(SortKey::Growth), true),
    ("ETA", None, true),
    ("HEAP HISTORY", None, false),
    ("LEAK", None, false),
];
const COMMAND_COLUMN: usize = 1;
const HISTORY_COLUMN: usize = 7;

/// Widths for a table `total` cells wide. Numbers get their full width
/// always (a cut number misleads); the command and the sparkline share
/// what is left, the command first.
fn column_widths(total: u16) -> [u16; 9] {
    // PID ▲ / 4194304, 3.10.13, 1023.9 MiB, +1023.9 MiB/min, 364d, LEAK
    let mut widths = [8, 0, 7, 10, 10, 15, 4, 0, 4];
    let spacing = COLUMN_SPACING * (widths.len() as u16 - 1);
    let rest = total.saturating_sub(widths.iter().sum::<u16>() + spacing);
    let history = rest
        .saturating_sub(MIN_COMMAND_WIDTH)
        .min(MAX_HISTORY_WIDTH);
    widths[HISTORY_COLUMN] = history;
    widths[COMMAND_COLUMN] = rest - history;
    widths
}

fn render_table(frame: &mut Frame, area: Rect, app: &App) {
    let visible = app.visible();
    if visible.is_empty() {
        frame.render_widget(empty_message(app), area);
        return;
    }
    let widths = column_widths(area.width);
    let history_width = usize::from(widths[HISTORY_COLUMN]);
    let rows = visible.iter().map(|p| process_row(p, history_width));
    let table = Table::new(rows, widths.map(Constraint::Length))
        .column_spacing(COLUMN_SPACING)
        .header(table_header(app.sort))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD));
    let mut state = TableState::new().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn table_header(sort: SortKey) -> Row<'static> {
    let cells = COLUMNS.map(|(title, key, right)| {
        let sorted = key == Some(sort);
        let text = if sorted {
            format!("{title} {}", sort_arrow(sort))
        } else {
            title.to_string()
        };
        let style = if sorted {
            Style::new().bold().underlined()
        } else {
            Style::new().bold()
        };
        Cell::from(aligned(text, right)).style(style)
    });
    Row::new(cells)
}

fn process_row(p: &ProcessInfo, history_width: usize) -> Row<'static> {
    let history: Vec<u64> = p.heap_history.iter().map(|&(_, bytes)| bytes).collect();
    Row::new([
        Cell::from(aligned(p.pid.to_string(), true)),
        Cell::from(text::short_command(command(p))),
        Cell::from(p.python_version.clone()),
        Cell::from(aligned(format::bytes(p.heap_bytes), true)),
        Cell::from(aligned(format::bytes(p.rss_bytes), true)),
        Cell::from(aligned(
            format::rate_per_minute(p.growth_bytes_per_second),
            true,
        )),
        eta_cell(p.time_to_limit_seconds),
        Cell::from(text::sparkline(&history, history_width)).fg(ACCENT),
        leak_cell(p.leak_suspected),
    ])
}

/// Under an hour to the limit is what the alert fires on: marked alike.
fn eta_cell(seconds: Option<f64>) -> Cell<'static> {
    let cell = Cell::from(aligned(format::eta(seconds), true));
    if seconds.is_some_and(|s| s < 3600.0) {
        cell.fg(ALERT).bold()
    } else {
        cell
    }
}

fn leak_cell(leak: bool) -> Cell<'static> {
    if leak {
        Cell::from("LEAK").fg(ALERT).bold()
    } else {
        Cell::from("")
    }
}

fn aligned(text: String, right: bool) -> Line<'static> {
    let line = Line::from(text);
    if right { line.right_aligned() } else { line }
}

/// The command line, or the command name when the kernel gave none.
pub fn command(p: &ProcessInfo) -> &str {
    if p.cmdline.is_empty() {
        &p.comm
    } else {
        &p.cmdline
    }
}

fn empty_message(app: &App) -> Paragraph<'static> {
    let text = if app.total_processes() == 0 {
        match app.status {
            Status::Waiting => "Waiting for the first sample…".to_string(),
            _ => "No Python processes observed yet.".to_string(),
        }
    } else {
        format!("No process matches the filter {:?}.", app.filter)
    };
    Paragraph::new(text)
}

fn render_detail(frame: &mut Frame, area: Rect, app: &App, pid: u32) {
    let Some(p) = app.detail_process() else {
        let gone = format!("pid {pid} is no longer observed (it exited). Esc goes back.");
        frame.render_widget(Paragraph::new(gone), area);
        return;
    };
    // Four lines and the borders, and one for the memory limit when known.
    let info_height = if p.memory_limit_bytes.is_some() { 7 } else { 6 };
    let [info, chart, sites] = Layout::vertical([
        Constraint::Length(info_height),
        Constraint::Fill(1),
        Constraint::Fill(1),
    ])
    .areas(area);
    let [chart, types] = Layout::horizontal([
        Constraint::Fill(1),
        Constraint::Length(TYPES_WIDTH.min(chart.width / 2)),
    ])
    .areas(chart);
    frame.render_widget(process_summary(p), info);
    render_heap_chart(frame, chart, p);
    let holders = app
        .types
        .report
        .as_ref()
        .map_or(0, |r| r.census.heap.holders.holders.len());
    if holders == 0 {
        render_types(frame, types, p.pid, &app.types);
    } else {
        // The holders under the types, from the same census.
        let rows = holders.min(HOLDERS_ROWS) as u16;
        let [types, below] =
            Layout::vertical([Constraint::Min(4), Constraint::Length(rows + 3)]).areas(types);
        render_types(frame, types, p.pid, &app.types);
        if let Some(report) = &app.types.report {
            frame.render_widget(holders_table(report, below.width), below);
        }
    }
    render_sites(frame, sites, p.pid, &app.sites);
}

/// Width of the object census block beside the heap chart.
const TYPES_WIDTH: u16 = 60;

/// The heaviest types of the process's last object census, with their
/// count growth since the census before, or why there is none.
fn render_types(frame: &mut Frame, area: Rect, pid: u32, state: &Types) {
    let mut block = Block::bordered().title(types_title(state.report.as_ref()));
    if let (Some(error), Some(_)) = (&state.error, &state.report) {
        block = block.title_bottom(Line::from(format!(" census failed: {error} ")).fg(ALERT));
    }
    let message = match (&state.report, &state.error) {
        (None, None) => Paragraph::new(format!(
            "Taking an object census of pid {pid} (it pauses the process while its heap is \
             copied)…"
        )),
        (None, Some(error)) => {
            Paragraph::new(format!("No object census (retried each minute): {error}")).fg(ALERT)
        }
        (Some(report), _) => {
            frame.render_widget(types_table(report, area.width).block(block), area);
            return;
        }
    };
    frame.render_widget(message.wrap(Wrap { trim: true }).block(block), area);
}

/// Holders the detail view shows under the types.
const HOLDERS_ROWS: usize = 5;

/// The heaviest holders of the last census: retained bytes, length, name
/// and type (names and sizes only).
fn holders_table(report: &CensusReport, width: u16) -> Table<'static> {
    const LENGTH: u16 = 9;
    const NUMBER: u16 = 10;
    const SPACING: u16 = 1;
    let holders = &report.census.heap.holders;
    let inner = width.saturating_sub(2);
    let rest = inner.saturating_sub(NUMBER + LENGTH + 3 * SPACING);
    let type_width = (rest / 3).min(16);
    let name_width = rest.saturating_sub(type_width);
    let header = Row::new([
        Cell::from(aligned("RETAINED".into(), true)),
        Cell::from(aligned("LENGTH".into(), true)),
        Cell::from("HOLDER"),
        Cell::from("TYPE"),
    ])
    .bold();
    let rows = holders.holders.iter().take(HOLDERS_ROWS).map(move |h| {
        Row::new([
            Cell::from(aligned(format::bytes(h.retained_bytes), true)).bold(),
            Cell::from(aligned(
                h.length.map_or_else(String::new, |l| l.to_string()),
                true,
            )),
            Cell::from(text::truncate(&h.name, usize::from(name_width))),
            Cell::from(text::truncate(&h.type_name, usize::from(type_width))),
        ])
    });
    let title = format!(
        " Top holders · unreachable {} ",
        format::bytes(holders.unreachable_bytes)
    );
    Table::new(
        rows,
        [NUMBER, LENGTH, name_width, type_width].map(Constraint::Length),
    )
    .column_spacing(SPACING)
    .header(header)
    .block(Block::bordered().title(title))
}

fn types_title(report: Option<&CensusReport>) -> String {
    match report {
        Some(report) => {
            let census = &report.census;
            let torn = if census.is_paused() {
                ""
            } else {
                ", may be torn"
            };
            format!(
                " Top types · {} objects, {}{torn} ",
                census.heap.objects,
                format::bytes(census.heap.object_bytes)
            )
        }
        None => " Top types ".to_string(),
    }
}

/// Count, bytes, count growth since the census before (blank without
/// one) and type name, heaviest first.
fn types_table(report: &CensusReport, width: u16) -> Table<'static> {
    const COUNT: u16 = 9;
    const NUMBER: u16 = 10;
    const SPACING: u16 = 1;
    let inner = width.saturating_sub(2);
    let name_width = inner.saturating_sub(2 * COUNT + NUMBER + 3 * SPACING);
    let growth: std::collections::HashMap<&str, i64> = report
        .growth
        .iter()
        .map(|g| (g.type_name.as_str(), g.count_delta))
        .collect();
    let header = Row::new([
        Cell::from(aligned("COUNT".into(), true)),
        Cell::from(aligned("BYTES".into(), true)),
        Cell::from(aligned("+COUNT".into(), true)),
        Cell::from("TYPE"),
    ])
    .bold();
    let has_previous = report.previous_taken_at.is_some();
    let rows = report.census.heap.types.iter().map(move |t| {
        let delta = match growth.get(t.type_name.as_str()) {
            _ if !has_previous => String::new(),
            Some(&d) if d != 0 => format!("{d:+}"),
            _ => "0".to_string(),
        };
        Row::new([
            Cell::from(aligned(t.count.to_string(), true)),
            Cell::from(aligned(format::bytes(t.bytes), true)).bold(),
            Cell::from(aligned(delta, true)),
            Cell::from(text::truncate(&t.type_name, usize::from(name_width))),
        ])
    });
    Table::new(
        rows,
        [COUNT, NUMBER, COUNT, name_width].map(Constraint::Length),
    )
    .column_spacing(SPACING)
    .header(header)
}

fn process_summary(p: &ProcessInfo) -> Paragraph<'static> {
    let label = |text: &'static str| Span::raw(format!("{text:<10}")).bold();
    let verdict = if p.leak_suspected {
        Span::raw("LEAK SUSPECTED").fg(ALERT).bold()
    } else {
        Span::raw("no leak suspected")
    };
    let h = &p.heap;
    let mut lines = vec![
        Line::from(vec![label("Command"), Span::raw(command(p).to_string())]),
        Line::from(vec![
            label("Python"),
            Span::raw(format!(
                "{} ({})   observed {}   accounting: {}",
                p.python_version,
                p.binary,
                format::duration(p.observed_seconds),
                accounting_label(p.accounting)
            )),
        ]),
        Line::from(vec![
            label("Heap"),
            Span::raw(format::bytes(p.heap_bytes)).bold(),
            Span::raw(format!(
                "  = arenas {} + raw {} + extensions {} + syscalls {}{}",
                format::bytes(h.arena_bytes),
                format::bytes(h.raw_bytes),
                format::bytes(h.extension_bytes),
                format::bytes(h.syscall_bytes),
                baseline_note(p)
            )),
        ]),
        Line::from(vec![
            label("RSS"),
            Span::raw(format::bytes(p.rss_bytes)),
            Span::raw("   growth "),
            Span::raw(format::rate_per_minute(p.growth_bytes_per_second)).bold(),
            Span::raw("   "),
            verdict,
        ]),
    ];
    if let Some(limit) = limit_line(p) {
        lines.push(Line::from(vec![label("Limit"), limit]));
    }
    let title = format!(" pid {} · {} ", p.pid, p.comm);
    Paragraph::new(lines)
        .block(Block::bordered().title(title))
        .wrap(Wrap { trim: true })
}

/// The memory limit, where it comes from, its usage and when the leak
/// reaches it; `None` when no limit is known.
fn limit_line(p: &ProcessInfo) -> Option<Span<'static>> {
    let limit = p.memory_limit_bytes?;
    let mut text = format::bytes(limit);
    if let Some(source) = &p.memory_limit_source {
        text.push_str(&format!(" ({source})"));
    }
    if let Some(usage) = p.memory_usage_bytes {
        let share = usage as f64 / limit.max(1) as f64 * 100.0;
        text.push_str(&format!("   used {} ({share:.0}%)", format::bytes(usage)));
    }
    if let Some(high) = p.memory_high_bytes {
        text.push_str(&format!("   soft limit {}", format::bytes(high)));
    }
    let span = match p.time_to_limit_seconds {
        Some(seconds) => {
            text.push_str(&format!("   reached in {}", format::eta(Some(seconds))));
            Span::raw(text).bold()
        }
        None => {
            text.push_str("   not approached (no leak)");
            Span::raw(text)
        }
    };
    Some(span)
}

fn accounting_label(accounting: Accounting) -> &'static str {
    match accounting {
        Accounting::Startup => "start-up (syscalls until probes attach)",
        Accounting::Probes => "probes (exact)",
        Accounting::Syscalls => "syscalls (over the probe budget)",
    }
}

fn render_heap_chart(frame: &mut Frame, area: Rect, p: &ProcessInfo) {
    // x: seconds relative to now (negative = past), y: heap bytes.
    let points: Vec<(f64, f64)> = p
        .heap_history
        .iter()
        .map(|&(ago, bytes)| (-ago, bytes as f64))
        .collect();
    let span = points.first().map_or(0.0, |&(x, _)| -x).max(1.0);
    let (low, high) = y_bounds(&points);
    let dataset = Dataset::default()
        .marker(Marker::Braille)
        .graph_type(GraphType::Line)
        .fg(ACCENT)
        .data(&points);
    let chart = Chart::new(vec![dataset])
        .block(Block::bordered().title(format!(" Heap history (last {}) ", format::duration(span))))
        .x_axis(
            Axis::default()
                .bounds([-span, 0.0])
                .labels([format!("-{}", format::duration(span)), "now".to_string()]),
        )
        .y_axis(
            Axis::default()
                .bounds([low, high])
                .labels([format::bytes(low as u64), format::bytes(high as u64)]),
        );
    frame.render_widget(chart, area);
}

/// The heap's range with a margin, so a flat line is not drawn on the edge.
fn y_bounds(points: &[(f64, f64)]) -> (f64, f64) {
    let min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if !min.is_finite() {
        return (0.0, 1024.0);
    }
    let margin = ((max - min) * 0.1).max(1024.0);
    ((min - margin).max(0.0), max + margin)
}

/// The process's top allocation sites, heaviest live bytes first (as many
/// as fit), or why there are none to show.
fn render_sites(frame: &mut Frame, area: Rect, pid: u32, state: &Sites) {
    let mut block = Block::bordered().title(sites_title(state.sites.as_deref()));
    if let (Some(error), Some(_)) = (&state.error, &state.sites) {
        // The last sites stay; the failure shows under them.
        block = block.title_bottom(
            Line::from(format!(" fetching failed: {error} "))
                .fg(ALERT)
                .bold(),
        );
    }
    let message = match (&state.sites, &state.error) {
        (None, None) => Paragraph::new(format!("Fetching the allocation sites of pid {pid}…")),
        (None, Some(error)) => Paragraph::new(format!(
            "Fetching the allocation sites failed (retried at every refresh): {error}"
        ))
        .fg(ALERT),
        (Some(list), _) if list.is_empty() => Paragraph::new(
            "No allocation sites yet: a Python line shows up here once it makes the heap \
             grow (a new pymalloc arena, or a sampled block outside pymalloc).",
        ),
        (Some(list), _) if list.iter().all(|site| site.file.is_empty()) => {
            let live = list.iter().map(|site| site.bytes).sum();
            Paragraph::new(format!(
                "No Python stacks for this process: the {} recorded so far was allocated with \
                 no Python frame running. If this stays so, its interpreter has no stack \
                 support here (`pymem agent` logs why).",
                format::bytes(live)
            ))
        }
        (Some(list), _) => {
            frame.render_widget(sites_table(list, area.width).block(block), area);
            return;
        }
    };
    frame.render_widget(message.wrap(Wrap { trim: true }).block(block), area);
}

fn sites_title(sites: Option<&[Site]>) -> String {
    match sites {
        Some(list) if !list.is_empty() => {
            let live = list.iter().map(|site| site.bytes).sum();
            let lines = if list.len() == 1 { "line" } else { "lines" };
            // Heap-state sites name the holder each line fills.
            let how = if list.iter().any(|site| site.holder.is_some()) {
                "· by heap state "
            } else {
                ""
            };
            format!(
                " Top allocation sites · {} {lines}, {} live {how}",
                list.len(),
                format::bytes(live)
            )
        }
        _ => " Top allocation sites ".to_string(),
    }
}

/// Live and allocated bytes, function and `file:line` per site, for a
/// bordered block `width` cells wide. Long paths lose their start (the
/// file name and line matter most), long functions their end.
fn sites_table(list: &[Site], width: u16) -> Table<'static> {
    const NUMBER: u16 = 10; // 1023.9 MiB
    // Wider than the process table's: a number next to a name reads as one
    // word otherwise.
    const SPACING: u16 = 2;
    let inner = width.saturating_sub(2);
    let longest = list
        .iter()
        .map(|site| site.function.chars().count())
        .max()
        .unwrap_or(0);
    let function_width = u16::try_from(longest)
        .unwrap_or(u16::MAX)
        .clamp("FUNCTION".len() as u16, MAX_FUNCTION_WIDTH);
    let location_width = inner.saturating_sub(2 * NUMBER + function_width + 3 * SPACING);
    let widths = [NUMBER, NUMBER, function_width, location_width];
    let header = Row::new([
        Cell::from(aligned("LIVE".into(), true)),
        Cell::from(aligned("ALLOCATED".into(), true)),
        Cell::from("FUNCTION"),
        Cell::from("LOCATION"),
    ])
    .bold();
    let rows = list.iter().map(|site| {
        Row::new([
            Cell::from(aligned(format::bytes(site.bytes), true)).bold(),
            Cell::from(aligned(format::bytes(site.allocated_bytes), true)),
            Cell::from(text::truncate(&site.function, usize::from(function_width))),
            Cell::from(text::truncate_start(
                &sites::location(&site.file, site.line),
                usize::from(location_width),
            )),
        ])
    });
    Table::new(rows, widths.map(Constraint::Length))
        .column_spacing(SPACING)
        .header(header)
}

fn help_line(app: &App) -> Line<'static> {
    let keys: &[(&str, &str)] = if app.editing_filter {
        &[
            ("type", "command substring"),
            ("Enter", "apply"),
            ("Esc", "clear"),
        ]
    } else {
        match app.view {
            View::List => &[
                ("q", "quit"),
                ("↑↓", "select"),
                ("Enter", "details"),
                ("s", "sort"),
                ("h/g/r/p", "heap/growth/rss/pid"),
                ("/", "filter"),
            ],
            View::Detail(_) => &[("Esc", "back"), ("q", "quit")],
        }
    };
    let spans = keys.iter().flat_map(|&(key, action)| {
        [
            Span::raw(key).bold().fg(ACCENT),
            Span::raw(format!(" {action}  ")),
        ]
    });
    Line::from(spans.collect::<Vec<_>>())
}

/// What the heap line adds for a process older than its observation.
fn baseline_note(p: &ProcessInfo) -> String {
    match p.heap_baseline {
        HeapBaseline::Observed => String::new(),
        HeapBaseline::Census => format!(
            " + before attach {} (census)",
            format::bytes(p.heap.before_attach_bytes)
        ),
        HeapBaseline::SinceAttach => "  (since attach: no census yet)".into(),
    }
}

#[cfg(test)]
mod tests {
    use crossterm::event::KeyCode;
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::top::app::tests::{
        app_with_samples, press, sample_census, sample_oom_kill, sample_processes, sample_sites,
        site, type_text,
    };

    /// `app` drawn on a `width` x `height` terminal.
    fn rendered(app: &App, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(frame, app)).unwrap();
        terminal.backend().buffer().clone()
    }

    /// The rendered screen as text, one line per row.
    fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
        let buffer = rendered(app, width, height);
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    /// Asserts that `shown` contains each of `expected`.
    #[track_caller]
    fn assert_shows(shown: &str, expected: &[&str]) {
        for text in expected {
            assert!(shown.contains(text), "{text:?} missing:\n{shown}");
        }
    }

    /// The foreground colour of one cell.
    fn buffer_fg(app: &App, width: u16, height: u16, x: u16, y: u16) -> Color {
        rendered(app, width, height)[(x, y)].fg
    }

    fn row_of(lines: &[String], needle: &str) -> usize {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not on screen:\n{}", lines.join("\n")))
    }

    #[test]
    fn table_shows_headers_units_and_leak_marker_in_growth_order() {
        let lines = screen(&app_with_samples(), 140, 12);
        let text = lines.join("\n");
        assert!(
            lines[0].contains("source: agent http://127.0.0.1:9477"),
            "{text}"
        );
        assert!(lines[0].contains("3/3 processes"), "{text}");
        assert!(lines[0].contains("sort: growth ▼"), "{text}");
        assert_shows(
            &lines[1],
            &[
                "PID",
                "COMMAND",
                "PYTHON",
                "HEAP",
                "RSS",
                "GROWTH ▼",
                "HEAP HISTORY",
                "LEAK",
            ],
        );
        let worker = row_of(&lines, "worker.py");
        let batch = row_of(&lines, "batch.py");
        let server = row_of(&lines, "http.server");
        assert!(worker < batch && batch < server, "growth order:\n{text}");
        let worker_line = &lines[worker];
        assert_shows(
            worker_line,
            &[
                "300",
                "3.11.7",
                "80.0 MiB",
                "120.0 MiB",
                "+120.0 MiB/min",
                "LEAK",
            ],
        );
        assert!(
            worker_line.contains('█') && worker_line.contains('▁'),
            "sparkline: {worker_line}"
        );
        assert!(!lines[server].contains("LEAK"), "{}", lines[server]);
        assert!(lines[server].contains("0 B/min"), "{}", lines[server]);
    }

    #[test]
    fn the_latest_oom_kill_is_a_banner_above_the_table() {
        let mut app = app_with_samples();
        let plain = screen(&app, 140, 12);
        assert!(plain[1].contains("PID"), "no banner without kills");
        let now = census::unix_seconds_now();
        let mut older = sample_oom_kill(now - 3600.0);
        older.pid = 299;
        app.on_oom_kills(Ok(vec![sample_oom_kill(now - 65.0), older]));
        let lines = screen(&app, 140, 12);
        assert_shows(
            &lines[1],
            &[
                "OOM-killed 1m 05s ago: pid 300 (python3 worker.py --queue jobs)",
                "heap 190.0 MiB, limit 200.0 MiB, top site /srv/worker.py:42",
                "(+1 earlier",
            ],
        );
        assert_eq!(buffer_fg(&app, 140, 12, 0, 1), ALERT);
        assert!(
            lines[2].contains("PID"),
            "the table moves down:\n{lines:#?}"
        );
        // A failed fetch (an agent without the route) keeps what was shown.
        app.on_oom_kills(Err("404".into()));
        assert!(screen(&app, 140, 12)[1].contains("OOM-killed"));
    }

    #[test]
    fn narrow_terminals_keep_numbers_whole_and_the_newest_history() {
        let narrow = screen(&app_with_samples(), 80, 8);
        let worker = &narrow[row_of(&narrow, "worker")];
        assert!(
            worker.contains("+120.0 MiB/min") && worker.contains("LEAK"),
            "{worker}"
        );
        let wide = screen(&app_with_samples(), 130, 8);
        let worker = &wide[row_of(&wide, "worker")];
        assert!(
            worker.contains("python3 worker.py --queue jobs"),
            "{worker}"
        );
        assert!(worker.contains("▁▂▂▃▄▅▅▆▇▇█"), "whole sparkline: {worker}");
    }

    #[test]
    fn selected_row_is_reversed_not_recoloured() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Down);
        let buffer = rendered(&app, 140, 12);
        // Row 2 is the first process (after header line and table header).
        let style_at = |y: u16| buffer[(2, y)].style();
        assert!(style_at(3).add_modifier.contains(Modifier::REVERSED));
        assert!(!style_at(2).add_modifier.contains(Modifier::REVERSED));
        assert_eq!(
            style_at(3).bg,
            Some(Color::Reset),
            "no hardcoded background"
        );
    }

    #[test]
    fn sort_change_moves_rows_and_the_indicator() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Char('h'));
        let lines = screen(&app, 140, 12);
        assert!(lines[0].contains("sort: heap ▼"));
        assert!(lines[1].contains("HEAP ▼") && !lines[1].contains("GROWTH ▼"));
        assert!(row_of(&lines, "http.server") < row_of(&lines, "worker.py"));
        press(&mut app, KeyCode::Char('p'));
        let lines = screen(&app, 140, 12);
        assert!(lines[1].contains("PID ▲"), "{}", lines[1]);
        assert!(row_of(&lines, "batch.py") < row_of(&lines, "http.server"));
    }

    #[test]
    fn filter_hides_other_processes_and_shows_in_the_header() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Char('/'));
        type_text(&mut app, "http");
        let lines = screen(&app, 140, 12);
        let text = lines.join("\n");
        assert!(lines[0].contains("filter: http"), "{text}");
        assert!(lines[0].contains("1/3 processes"), "{text}");
        assert!(
            text.contains("http.server") && !text.contains("worker.py"),
            "{text}"
        );
        assert!(
            lines[11].contains("Enter apply"),
            "help while typing:\n{text}"
        );

        type_text(&mut app, "zzz");
        let text = screen(&app, 140, 12).join("\n");
        assert!(
            text.contains("No process matches the filter \"httpzzz\""),
            "{text}"
        );
    }

    #[test]
    fn help_line_lists_the_keys_within_80_columns() {
        let lines = screen(&app_with_samples(), 80, 12);
        let help = lines[11].trim_end();
        assert!(help.ends_with("/ filter"), "cut at 80 columns: {help}");
        assert_shows(
            help,
            &[
                "q quit",
                "↑↓ select",
                "Enter details",
                "s sort",
                "h/g/r/p heap/growth/rss/pid",
            ],
        );
    }

    /// The worker's detail view, after `sites` answered for it.
    fn detail_with_sites(sites: Result<Vec<Site>, String>) -> App {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Enter);
        app.on_sites(300, sites);
        app
    }

    /// The rows of the sites block: from its title to its bottom border.
    fn sites_block(lines: &[String]) -> Vec<String> {
        let top = row_of(lines, "Top allocation sites");
        let bottom = (top + 1..lines.len())
            .find(|&y| lines[y].starts_with('└'))
            .expect("bottom border of the sites block");
        lines[top..=bottom]
            .iter()
            .map(|l| l.trim_end().to_string())
            .collect()
    }

    #[test]
    fn detail_view_shows_summary_chart_and_top_sites() {
        let app = detail_with_sites(Ok(sample_sites()));
        let lines = screen(&app, 120, 30);
        let text = lines.join("\n");
        assert_shows(
            &text,
            &[
                "pid 300 · python3",
                "python3 worker.py --queue jobs",
                "3.11.7 (/usr/bin/python3.11)",
                "80.0 MiB",
                "+120.0 MiB/min",
                "LEAK SUSPECTED",
                "Heap history (last 10s)",
                "-10s",
                "now",
                "Esc back",
            ],
        );
        assert!(
            text.contains('⠀') || text.chars().any(|c| ('\u{2801}'..='\u{28ff}').contains(&c)),
            "braille line:\n{text}"
        );
        assert_eq!(
            sites_block(&lines),
            [
                "┌ Top allocation sites · 4 lines, 80.0 MiB live ───────────────────────────────────────────────────────────────────────┐",
                "│      LIVE   ALLOCATED  FUNCTION           LOCATION                                                                   │",
                "│  70.0 MiB    70.0 MiB  append_result      /srv/worker/jobs.py:42                                                     │",
                "│   8.0 MiB     9.0 MiB  decode_payload     …t/venvs/worker-2024/lib/python3.11/site-packages/fastcodec/decoder.py:1187│",
                "│   2.0 MiB     2.0 MiB  _compile_bytecode  <frozen importlib._bootstrap_external>:729                                 │",
                "│       0 B   300.0 MiB  <listcomp>         /srv/worker/jobs.py:57                                                     │",
                "│                                                                                                                      │",
                "│                                                                                                                      │",
                "│                                                                                                                      │",
                "│                                                                                                                      │",
                "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            ],
            "\n{text}"
        );
    }

    #[test]
    fn sites_fill_the_block_heaviest_first_and_paths_lose_their_start() {
        let many: Vec<Site> = (0..40u64)
            .map(|i| {
                site(
                    "handler",
                    "/srv/worker/jobs.py",
                    100 + i as i64,
                    (40 - i) << 20,
                    64 << 20,
                )
            })
            .collect();
        let app = detail_with_sites(Ok(many));
        let block = sites_block(&screen(&app, 120, 30));
        let rows = &block[2..block.len() - 1];
        assert_eq!(rows.len(), 8, "as many as fit:\n{}", block.join("\n"));
        assert!(
            rows[0].contains("40.0 MiB") && rows[0].contains("jobs.py:100"),
            "{}",
            rows[0]
        );
        assert!(
            rows[7].contains("33.0 MiB") && rows[7].contains("jobs.py:107"),
            "{}",
            rows[7]
        );

        let app = detail_with_sites(Ok(sample_sites()));
        let block = sites_block(&screen(&app, 72, 30));
        let decoder = &block[row_of(&block, "decode_payload")];
        assert!(
            decoder.contains(" …") && decoder.ends_with("/fastcodec/decoder.py:1187│"),
            "shortened from the left: {decoder}"
        );
    }

    #[test]
    fn detail_view_says_when_there_are_no_sites_yet() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Enter);
        let block = sites_block(&screen(&app, 120, 30)).join("\n");
        assert!(
            block.contains("Fetching the allocation sites of pid 300…"),
            "{block}"
        );

        let app = detail_with_sites(Ok(Vec::new()));
        let block = sites_block(&screen(&app, 120, 30)).join("\n");
        assert!(block.contains("┌ Top allocation sites ─"), "{block}");
        assert!(
            block.contains(
                "No allocation sites yet: a Python line shows up here once it makes the heap grow"
            ),
            "{block}"
        );
    }

    #[test]
    fn detail_view_explains_a_process_without_python_stacks() {
        // What the API answers for a process whose interpreter has no stack
        // support: all its memory at one frameless site.
        let app = detail_with_sites(Ok(vec![site(
            "<no Python stack>",
            "",
            0,
            12 << 20,
            12 << 20,
        )]));
        let block = sites_block(&screen(&app, 120, 30)).join("\n");
        assert!(
            block.contains("┌ Top allocation sites · 1 line, 12.0 MiB live ─"),
            "{block}"
        );
        assert!(
            block.contains("No Python stacks for this process: the 12.0 MiB recorded so far"),
            "{block}"
        );
        assert!(block.contains("no stack"), "{block}");
        assert!(!block.contains("LOCATION"), "{block}");
    }

    #[test]
    fn detail_view_shows_fetch_errors_with_or_without_earlier_sites() {
        let error = "GET http://127.0.0.1:9477/api/v1/processes/300/sites: 503 Service Unavailable: observer stopped";
        let app = detail_with_sites(Err(error.into()));
        let lines = screen(&app, 120, 30);
        let block = sites_block(&lines).join("\n");
        assert!(
            block.contains("Fetching the allocation sites failed (retried at every refresh): GET"),
            "{block}"
        );
        assert!(
            block.contains("observer stopped"),
            "wrapped, not cut:\n{block}"
        );
        let y = row_of(&lines, "Fetching the allocation sites failed");
        assert_eq!(buffer_fg(&app, 120, 30, 2, y as u16), ALERT);

        let mut app = detail_with_sites(Ok(sample_sites()));
        app.on_sites(300, Err(error.into()));
        let block = sites_block(&screen(&app, 120, 30));
        assert!(
            block[2].contains("append_result"),
            "last sites kept:\n{}",
            block.join("\n")
        );
        assert!(
            block.last().unwrap().starts_with(
                "└ fetching failed: GET http://127.0.0.1:9477/api/v1/processes/300/sites"
            ),
            "{}",
            block.join("\n")
        );
    }

    #[test]
    fn detail_view_shows_the_census_beside_the_chart() {
        let mut app = detail_with_sites(Ok(sample_sites()));
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("┌ Top types ─"), "{text}");
        assert!(
            text.contains("Taking an object census of pid 300"),
            "{text}"
        );
        app.on_types(300, Ok(sample_census()));
        let lines = screen(&app, 120, 30);
        let top = row_of(&lines, "Top types");
        let block: Vec<&str> = lines[top..top + 5]
            .iter()
            .map(|l| l.split_at(l.char_indices().nth(60).unwrap().0).1.trim_end())
            .collect();
        assert_eq!(
            block,
            [
                "┌ Top types · 170500 objects, 32.7 MiB ────────────────────┐",
                "│    COUNT      BYTES    +COUNT TYPE                       │",
                "│   120000   30.0 MiB       +20 dict                       │",
                "│    50000    2.7 MiB    +50000 jobs.Result                │",
                "│      500   27.3 KiB         0 builtins.function          │",
            ],
            "\n{}",
            lines.join("\n")
        );
        assert_eq!(
            sites_block(&lines).len(),
            11,
            "the sites block keeps its size"
        );

        app.on_types(
            300,
            Err("no object census of pid 300: unsupported build".into()),
        );
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("└ census failed: no object census"), "{text}");
        press(&mut app, KeyCode::Esc);
        press(&mut app, KeyCode::Enter);
        app.on_types(
            300,
            Err("no object census of pid 300: unsupported build".into()),
        );
        let text = screen(&app, 120, 30).join("\n");
        assert!(
            text.contains("No object census (retried each minute): no object"),
            "{text}"
        );
    }

    #[test]
    fn detail_view_shows_the_top_holders_under_the_types() {
        let mut app = detail_with_sites(Ok(sample_sites()));
        let mut census = sample_census();
        census.census.heap.holders = crate::holders::tests::sample_holders();
        app.on_types(300, Ok(census));
        let lines = screen(&app, 120, 30);
        let top = row_of(&lines, "Top holders");
        let block: Vec<&str> = lines[top..top + 6]
            .iter()
            .map(|l| l.split_at(l.char_indices().nth(60).unwrap().0).1.trim_end())
            .collect();
        assert_eq!(
            block,
            [
                "┌ Top holders · unreachable 2.0 KiB ───────────────────────┐",
                "│  RETAINED    LENGTH HOLDER                   TYPE        │",
                "│  32.0 MiB    200000 __main__.ORDERS          list        │",
                "│  20.0 MiB    100000 __main__.TOKENS          dict        │",
                "│   3.1 MiB    100000 thread 7 / hold_batch /… list        │",
                "└──────────────────────────────────────────────────────────┘",
            ],
            "\n{}",
            lines.join("\n")
        );
        assert!(row_of(&lines, "Top types") < top, "types first");
        assert_eq!(
            sites_block(&lines).len(),
            11,
            "the sites block keeps its size"
        );
    }

    /// The sample processes with the leaking worker 42 minutes from its
    /// cgroup's limit and the server under the host's memory.
    fn app_with_limits() -> App {
        let mut processes = sample_processes();
        for p in &mut processes {
            match p.pid {
                300 => {
                    p.memory_limit_bytes = Some(512 << 20);
                    p.memory_limit_source =
                        Some("cgroup v2 memory.max /sys/fs/cgroup/worker".into());
                    p.memory_usage_bytes = Some(128 << 20);
                    p.memory_high_bytes = Some(384 << 20);
                    p.time_to_limit_seconds = Some(42.0 * 60.0 + 30.0);
                }
                200 => {
                    p.memory_limit_bytes = Some(16 << 30);
                    p.memory_limit_source = Some("host".into());
                    p.memory_usage_bytes = Some(4 << 30);
                }
                _ => {}
            }
        }
        let mut app = app_with_samples();
        app.on_data(Ok(processes));
        app
    }

    #[test]
    fn eta_column_shows_the_time_to_the_limit_or_a_dash() {
        let app = app_with_limits();
        let lines = screen(&app, 140, 12);
        let text = lines.join("\n");
        assert!(lines[1].contains("ETA"), "{text}");
        let worker = &lines[row_of(&lines, "worker.py")];
        assert_shows(worker, &["+120.0 MiB/min", "42m", "LEAK"]);
        for other in ["http.server", "batch.py"] {
            let line = &lines[row_of(&lines, other)];
            assert!(line.contains(" - "), "no ETA: {line}");
        }
        let x = worker.find("42m").unwrap();
        let x = worker[..x].chars().count() as u16;
        let y = row_of(&lines, "worker.py") as u16;
        assert_eq!(buffer_fg(&app, 140, 12, x, y), ALERT, "under an hour");
        let narrow = screen(&app, 80, 8);
        let worker = &narrow[row_of(&narrow, "worker")];
        assert_shows(worker, &["+120.0 MiB/min", "42m", "LEAK"]);
    }

    #[test]
    fn detail_view_shows_the_memory_limit() {
        let mut app = app_with_limits();
        press(&mut app, KeyCode::Enter);
        app.on_sites(300, Ok(sample_sites()));
        let text = screen(&app, 160, 30).join("\n");
        assert_shows(
            &text,
            &[
                "Limit",
                "512.0 MiB (cgroup v2 memory.max /sys/fs/cgroup/worker)",
                "used 128.0 MiB (25%)",
                "soft limit 384.0 MiB",
                "reached in 42m",
                "append_result",
            ],
        );
    }

    #[test]
    fn detail_view_of_an_exited_process_says_so() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Enter);
        let remaining: Vec<_> = sample_processes()
            .into_iter()
            .filter(|p| p.pid != 300)
            .collect();
        app.on_data(Ok(remaining));
        let text = screen(&app, 120, 20).join("\n");
        assert!(text.contains("pid 300 is no longer observed"), "{text}");
    }

    #[test]
    fn fetch_errors_show_in_the_header_without_losing_rows() {
        let mut app = app_with_samples();
        app.on_data(Err(
            "GET http://127.0.0.1:9477/api/v1/processes: connection refused".into(),
        ));
        let lines = screen(&app, 160, 12);
        assert!(lines[0].contains("error: GET"), "{}", lines[0]);
        assert!(lines.join("\n").contains("worker.py"));
    }

    #[test]
    fn no_processes_yet_is_explained() {
        let app = App::new("embedded observer".into(), SortKey::Growth, String::new());
        let text = screen(&app, 100, 8).join("\n");
        assert!(text.contains("source: embedded observer"), "{text}");
        assert!(text.contains("Waiting for the first sample"), "{text}");
    }
}
