//! The state of `pymem top` and how keys and data change it. No I/O and no
//! drawing: `ui::render` turns this state into a frame.
use std::cmp::Ordering;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::{
    census::CensusReport,
    model::{OomKill, ProcessInfo},
    sites::Site,
};

/// Column the process table is ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Heap,
    Growth,
    Rss,
    Pid,
}

impl SortKey {
    /// The order `s` cycles through.
    const CYCLE: [SortKey; 4] = [SortKey::Growth, SortKey::Heap, SortKey::Rss, SortKey::Pid];

    pub fn label(self) -> &'static str {
        match self {
            Self::Heap => "heap",
            Self::Growth => "growth",
            Self::Rss => "rss",
            Self::Pid => "pid",
        }
    }

    /// Sizes and rates biggest first (what needs attention); pids ascending.
    pub fn descending(self) -> bool {
        self != Self::Pid
    }

    fn next(self) -> Self {
        let at = Self::CYCLE.iter().position(|&k| k == self).unwrap_or(0);
        Self::CYCLE[(at + 1) % Self::CYCLE.len()]
    }

    fn compare(self, a: &ProcessInfo, b: &ProcessInfo) -> Ordering {
        let by_key = match self {
            Self::Heap => b.heap_bytes.cmp(&a.heap_bytes),
            Self::Growth => b
                .growth_bytes_per_second
                .total_cmp(&a.growth_bytes_per_second),
            Self::Rss => b.rss_bytes.cmp(&a.rss_bytes),
            Self::Pid => Ordering::Equal,
        };
        // Ties by pid keep rows from swapping places between refreshes.
        by_key.then(a.pid.cmp(&b.pid))
    }
}

/// Whether `process` matches a command filter: a case-insensitive substring
/// of its command line or command name. An empty filter matches everything.
pub fn matches_filter(process: &ProcessInfo, filter: &str) -> bool {
    let needle = filter.to_lowercase();
    process.cmdline.to_lowercase().contains(&needle)
        || process.comm.to_lowercase().contains(&needle)
}

/// The processes to show, filtered and in order (the TUI and `--once`).
pub fn select<'a>(
    processes: &'a [ProcessInfo],
    sort: SortKey,
    filter: &str,
) -> Vec<&'a ProcessInfo> {
    let mut shown: Vec<&ProcessInfo> = processes
        .iter()
        .filter(|p| matches_filter(p, filter))
        .collect();
    shown.sort_by(|a, b| sort.compare(a, b));
    shown
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    List,
    /// One process, by pid.
    Detail(u32),
}

/// How the latest fetch went.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Waiting,
    Live,
    /// The last fetch failed; the table shows the data before it.
    Failed(String),
}

/// The allocation sites of the process in the detail view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sites {
    /// The last answer, heaviest first; `None` until the first one.
    pub sites: Option<Vec<Site>>,
    /// Why the last fetch failed (the sites before it stay shown).
    pub error: Option<String>,
}

/// The object census of the process in the detail view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Types {
    /// The last census, with growth since the one before; `None` until the
    /// first answer.
    pub report: Option<CensusReport>,
    /// Why the last census failed (the one before it stays shown).
    pub error: Option<String>,
}

pub struct App {
    /// Where the data comes from, for the header.
    pub source: String,
    processes: Vec<ProcessInfo>,
    pub sort: SortKey,
    pub filter: String,
    pub editing_filter: bool,
    pub view: View,
    pub status: Status,
    /// Sites of the detail view's process (reset when a detail view opens).
    pub sites: Sites,
    /// Object census of the detail view's process (reset with `sites`).
    pub types: Types,
    /// Post-mortems of processes killed for memory, newest first.
    pub oom_kills: Vec<OomKill>,
    /// The selection follows a process across refreshes and re-sorts...
    selected_pid: Option<u32>,
    /// ...and falls back to its last row when that process goes away.
    selected_row: usize,
    pub should_quit: bool,
}

impl App {
    pub fn new(source: String, sort: SortKey, filter: String) -> Self {
        Self {
            source,
            processes: Vec::new(),
            sort,
            filter,
            editing_filter: false,
            view: View::List,
            status: Status::Waiting,
            sites: Sites::default(),
            types: Types::default(),
            oom_kills: Vec::new(),
            selected_pid: None,
            selected_row: 0,
            should_quit: false,
        }
    }

    pub fn on_data(&mut self, data: Result<Vec<ProcessInfo>, String>) {
        match data {
            Ok(processes) => {
                self.processes = processes;
                self.status = Status::Live;
            }
            Err(error) => self.status = Status::Failed(error),
        }
    }

    /// The agent's post-mortems; a failed fetch (an agent without the
    /// route) keeps the ones before.
    pub fn on_oom_kills(&mut self, data: Result<Vec<OomKill>, String>) {
        if let Ok(kills) = data {
            self.oom_kills = kills;
        }
    }

    /// An answer to a sites fetch for `pid`; ignored unless that process's
    /// detail view is (still) open.
    pub fn on_sites(&mut self, pid: u32, data: Result<Vec<Site>, String>) {
        if self.view != View::Detail(pid) {
            return;
        }
        match data {
            Ok(sites) => {
                self.sites.sites = Some(sites);
                self.sites.error = None;
            }
            Err(error) => self.sites.error = Some(error),
        }
    }

    /// An answer to a census fetch for `pid`; ignored unless that
    /// process's detail view is (still) open.
    pub fn on_types(&mut self, pid: u32, data: Result<CensusReport, String>) {
        if self.view != View::Detail(pid) {
            return;
        }
        match data {
            Ok(report) => {
                self.types.report = Some(report);
                self.types.error = None;
            }
            Err(error) => self.types.error = Some(error),
        }
    }

    /// The process whose sites the data source should fetch: the one in
    /// the detail view, while it is open.
    pub fn sites_wanted(&self) -> Option<u32> {
        match self.view {
            View::Detail(pid) => Some(pid),
            View::List => None,
        }
    }

    pub fn total_processes(&self) -> usize {
        self.processes.len()
    }

    pub fn visible(&self) -> Vec<&ProcessInfo> {
        select(&self.processes, self.sort, &self.filter)
    }

    /// Row of the selection in `visible()`, if any row is shown.
    pub fn selected_index(&self) -> Option<usize> {
        let visible = self.visible();
        if visible.is_empty() {
            return None;
        }
        let by_pid = self
            .selected_pid
            .and_then(|pid| visible.iter().position(|p| p.pid == pid));
        Some(by_pid.unwrap_or(self.selected_row.min(visible.len() - 1)))
    }

    /// The process of the detail view, while it is still observed.
    pub fn detail_process(&self) -> Option<&ProcessInfo> {
        match self.view {
            View::Detail(pid) => self.processes.iter().find(|p| p.pid == pid),
            View::List => None,
        }
    }

    pub fn on_key(&mut self, key: KeyEvent) {
        // Terminals with the kitty protocol also report releases.
        if key.kind != KeyEventKind::Press {
            return;
        }
        // Raw mode swallows SIGINT: Ctrl-C quits from anywhere.
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.should_quit = true;
            return;
        }
        if self.editing_filter {
            self.on_filter_key(key.code);
            return;
        }
        match self.view {
            View::List => self.on_list_key(key.code),
            View::Detail(_) => self.on_detail_key(key.code),
        }
    }

    fn on_filter_key(&mut self, code: KeyCode) {
        match code {
            KeyCode::Enter => self.editing_filter = false,
            KeyCode::Esc => {
                self.filter.clear();
                self.editing_filter = false;
            }
            KeyCode::Backspace => {
                self.filter.pop();
            }
            KeyCode::Char(c) => self.filter.push(c),
            _ => {}
        }
    }

    fn on_list_key(&mut self, code: KeyCode) {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => self.should_quit = true,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home => self.move_selection(isize::MIN),
            KeyCode::End => self.move_selection(isize::MAX),
            KeyCode::Enter => self.open_detail(),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('h') => self.sort = SortKey::Heap,
            KeyCode::Char('g') => self.sort = SortKey::Growth,
            KeyCode::Char('r') => self.sort = SortKey::Rss,
            KeyCode::Char('p') => self.sort = SortKey::Pid,
            KeyCode::Char('/') => self.editing_filter = true,
            _ => {}
        }
    }

    fn on_detail_key(&mut self, code: KeyCode) {
        match code {
            KeyCode::Char('q') => self.should_quit = true,
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => self.view = View::List,
            _ => {}
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let Some(current) = self.selected_index() else {
            return;
        };
        let pids: Vec<u32> = self.visible().iter().map(|p| p.pid).collect();
        let row = current.saturating_add_signed(delta).min(pids.len() - 1);
        self.selected_row = row;
        self.selected_pid = Some(pids[row]);
    }

    fn open_detail(&mut self) {
        if let Some(row) = self.selected_index() {
            let pid = self.visible()[row].pid;
            self.selected_pid = Some(pid);
            self.view = View::Detail(pid);
            self.sites = Sites::default();
            self.types = Types::default();
        }
    }
}

#[cfg(test)]
pub mod tests {
    use serde_json::json;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A process as the API reports it (built from JSON, as the TUI gets
    /// it); the history grows by `growth` bytes/s over the last 10 s.
    pub fn process(pid: u32, cmdline: &str, heap: u64, rss: u64, growth: f64) -> ProcessInfo {
        let comm = cmdline.split_whitespace().next().unwrap_or("python3");
        let history: Vec<(f64, u64)> = (0..=10)
            .rev()
            .map(|ago| {
                (
                    ago as f64,
                    (heap as f64 - growth * ago as f64).max(0.0) as u64,
                )
            })
            .collect();
        let totals = json!({"arena": heap, "raw": 0, "extension": 0, "syscall": 0});
        serde_json::from_value(json!({
            "pid": pid,
            "ns_pid": pid,
            "comm": comm,
            "cmdline": cmdline,
            "python_version": "3.11.7",
            "binary": "/usr/bin/python3.11",
            "heap_bytes": heap,
            "heap": {"arena_bytes": heap, "raw_bytes": 0, "extension_bytes": 0, "syscall_bytes": 0},
            "growth_bytes_per_second": growth,
            "rss_bytes": rss,
            "leak_suspected": false,
            "allocated_bytes_total": heap,
            "freed_bytes_total": 0,
            "allocated_bytes_by_source": totals,
            "freed_bytes_by_source": {"arena": 0, "raw": 0, "extension": 0, "syscall": 0},
            "accounting": "probes",
            "probe_hits_per_second": 0.0,
            "observed_seconds": 10.0,
            "heap_history": history,
        }))
        .expect("a ProcessInfo as the API serves it")
    }

    /// A census of the worker: dicts, its leaking results, functions; with
    /// growth since a census before it.
    pub fn sample_census() -> CensusReport {
        serde_json::from_value(json!({
            "pid": 300,
            "taken_at": 1000.0,
            "consistency": "paused",
            "pause_seconds": 0.012,
            "copy_seconds": 0.010,
            "parse_seconds": 0.2,
            "copied_bytes": 64u64 << 20,
            "heap": {
                "types": [
                    {"type": "dict", "count": 120000, "bytes": 30u64 << 20},
                    {"type": "jobs.Result", "count": 50000, "bytes": 2_800_000},
                    {"type": "builtins.function", "count": 500, "bytes": 28_000},
                ],
                "objects": 170500, "object_bytes": 34_285_920u64, "gc_tracked": 170000,
                "arenas": 1, "arena_bytes": 1u64 << 20, "pool_used_bytes": 0,
                "unattributed_bytes": 0, "outside_pymalloc_bytes": 0, "warnings": [],
            },
            "previous_taken_at": 990.0,
            "growth": [
                {"type": "jobs.Result", "count": 50000, "bytes": 2_800_000, "count_delta": 50000, "bytes_delta": 2_800_000},
                {"type": "dict", "count": 120000, "bytes": 30u64 << 20, "count_delta": 20, "bytes_delta": 1000},
            ],
        }))
        .expect("a census report as the API serves it")
    }

    /// Three processes: a leaking worker, a big steady server, a small job.
    pub fn sample_processes() -> Vec<ProcessInfo> {
        let mut worker = process(
            300,
            "python3 worker.py --queue jobs",
            80 * MIB,
            120 * MIB,
            2.0 * MIB as f64,
        );
        worker.leak_suspected = true;
        vec![
            process(200, "python3 -m http.server", 500 * MIB, 600 * MIB, 0.0),
            worker,
            process(100, "python3 batch.py", 5 * MIB, 900 * MIB, 1024.0),
        ]
    }

    /// A site as the API reports it (its stack is just the site's frame).
    pub fn site(function: &str, file: &str, line: i64, live: u64, allocated: u64) -> Site {
        Site {
            function: function.into(),
            file: file.into(),
            line,
            bytes: live,
            allocated_bytes: allocated,
            stack: vec![crate::cpython::Frame {
                function: function.into(),
                file: file.into(),
                line,
            }],
            ..Default::default()
        }
    }

    /// The leaking worker's sites, heaviest first: two leaks, an import, a
    /// churning line that holds nothing.
    pub fn sample_sites() -> Vec<Site> {
        vec![
            site(
                "append_result",
                "/srv/worker/jobs.py",
                42,
                70 * MIB,
                70 * MIB,
            ),
            site(
                "decode_payload",
                "/opt/venvs/worker-2024/lib/python3.11/site-packages/fastcodec/decoder.py",
                1187,
                8 * MIB,
                9 * MIB,
            ),
            site(
                "_compile_bytecode",
                "<frozen importlib._bootstrap_external>",
                729,
                2 * MIB,
                2 * MIB,
            ),
            site("<listcomp>", "/srv/worker/jobs.py", 57, 0, 300 * MIB),
        ]
    }

    pub fn app_with_samples() -> App {
        let mut app = App::new(
            "agent http://127.0.0.1:9477".into(),
            SortKey::Growth,
            String::new(),
        );
        app.on_data(Ok(sample_processes()));
        app
    }

    /// The worker's post-mortem, killed at `killed_at` (Unix seconds) at
    /// 190 MiB of a 200 MiB limit, as the API serves it.
    pub fn sample_oom_kill(killed_at: f64) -> OomKill {
        serde_json::from_value(json!({
            "killed_at": killed_at,
            "recorded_after_seconds": 0.002,
            "pid": 300,
            "comm": "python3",
            "cmdline": "python3 worker.py --queue jobs",
            "python_version": "3.11.7",
            "heap_bytes": 190 * MIB,
            "heap": {"arena_bytes": 10 * MIB, "raw_bytes": 180 * MIB, "extension_bytes": 0, "syscall_bytes": 0},
            "heap_history": [[1.0, 180 * MIB], [0.0, 190 * MIB]],
            "anon_rss_bytes": 199 * MIB,
            "cgroup": "/kubepods/pod1/c1",
            "limit_bytes": 200 * MIB,
            "limit_cgroup": "/sys/fs/cgroup/kubepods/pod1/c1",
            "top_sites": [site("handle", "/srv/worker.py", 42, 170 * MIB, 170 * MIB)],
            "unreadable_stacks": 0,
        }))
        .expect("a post-mortem as the API serves it")
    }

    pub fn press(app: &mut App, code: KeyCode) {
        app.on_key(KeyEvent::from(code));
    }

    /// Presses one key for each character of `text`.
    pub fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    fn visible_pids(app: &App) -> Vec<u32> {
        app.visible().iter().map(|p| p.pid).collect()
    }

    #[test]
    fn sort_keys_order_rows() {
        let mut app = app_with_samples();
        assert_eq!(visible_pids(&app), [300, 100, 200], "growth");
        press(&mut app, KeyCode::Char('h'));
        assert_eq!(visible_pids(&app), [200, 300, 100], "heap");
        press(&mut app, KeyCode::Char('r'));
        assert_eq!(visible_pids(&app), [100, 200, 300], "rss");
        press(&mut app, KeyCode::Char('p'));
        assert_eq!(visible_pids(&app), [100, 200, 300], "pid");
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.sort, SortKey::Growth, "s cycles back to growth");
    }

    #[test]
    fn filter_is_typed_after_slash_and_cleared_by_esc() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Char('/'));
        type_text(&mut app, "WORK");
        assert_eq!(visible_pids(&app), [300], "case-insensitive substring");
        press(&mut app, KeyCode::Enter);
        assert!(!app.editing_filter);
        press(&mut app, KeyCode::Char('q'));
        assert!(app.should_quit, "q quits once the filter is applied");

        let mut app = app_with_samples();
        press(&mut app, KeyCode::Char('/'));
        press(&mut app, KeyCode::Char('q'));
        assert!(!app.should_quit, "q is text while typing a filter");
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.filter, "");
        assert_eq!(visible_pids(&app).len(), 3);
    }

    #[test]
    fn selection_follows_its_process_across_refreshes() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Down);
        assert_eq!(app.selected_index(), Some(1));
        let mut refreshed = sample_processes();
        refreshed[2].growth_bytes_per_second = 1e9; // pid 100 jumps to the top
        app.on_data(Ok(refreshed));
        assert_eq!(app.visible()[app.selected_index().unwrap()].pid, 100);
        press(&mut app, KeyCode::End);
        assert_eq!(app.selected_index(), Some(2));
        press(&mut app, KeyCode::Home);
        assert_eq!(app.selected_index(), Some(0));
    }

    #[test]
    fn enter_opens_details_and_esc_goes_back() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.view, View::Detail(300));
        assert_eq!(app.detail_process().unwrap().pid, 300);
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.view, View::List);
        assert!(!app.should_quit, "Esc in the detail view only goes back");
        press(&mut app, KeyCode::Esc);
        assert!(app.should_quit, "Esc in the list quits");
    }

    #[test]
    fn sites_are_wanted_only_while_a_detail_view_is_open() {
        let mut app = app_with_samples();
        assert_eq!(app.sites_wanted(), None);
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.sites_wanted(), Some(300));
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.sites_wanted(), None);
    }

    #[test]
    fn sites_answers_apply_to_their_own_detail_view_only() {
        let mut app = app_with_samples();
        app.on_sites(300, Ok(sample_sites()));
        assert_eq!(app.sites, Sites::default(), "no detail view open");
        press(&mut app, KeyCode::Enter);
        app.on_sites(200, Ok(sample_sites()));
        assert_eq!(app.sites.sites, None, "another process's answer");
        app.on_sites(300, Ok(sample_sites()));
        assert_eq!(app.sites.sites.as_ref().unwrap().len(), 4);

        app.on_sites(300, Err("timed out".into()));
        assert_eq!(app.sites.error.as_deref(), Some("timed out"));
        assert_eq!(
            app.sites.sites.as_ref().unwrap().len(),
            4,
            "a failed fetch keeps the last sites"
        );
        app.on_sites(300, Ok(Vec::new()));
        assert_eq!(app.sites.error, None, "an answer clears the error");

        press(&mut app, KeyCode::Esc);
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.sites, Sites::default(), "reopening starts afresh");
    }

    #[test]
    fn ctrl_c_quits_even_while_typing() {
        let mut app = app_with_samples();
        press(&mut app, KeyCode::Char('/'));
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(app.should_quit);
    }

    #[test]
    fn failed_fetch_keeps_the_last_data() {
        let mut app = app_with_samples();
        app.on_data(Err("connection refused".into()));
        assert_eq!(app.total_processes(), 3);
        assert_eq!(app.status, Status::Failed("connection refused".into()));
    }
}
