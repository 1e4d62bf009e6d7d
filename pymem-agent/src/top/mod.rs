//! `pymem top`: a live terminal view of every Python process's memory.
//!
//! An input thread, a data thread and a census thread feed one event
//! channel; the main thread applies each event to `App` and redraws it
//! (`ui::render` is pure state -> frame). The data comes from a running
//! agent or, when none answers, from an observer embedded in this process.
//! The main thread tells the data thread which process's allocation sites
//! to fetch along (the one in the detail view, if any); what needs a
//! census of it (its sites by heap state, its types) waits on the census
//! thread, never in the way of the process list.
mod app;
pub mod source;
pub(crate) mod text;
mod ui;

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use crossterm::event::{self, KeyEvent};

use self::{
    app::{App, SortKey},
    source::{EmbeddedObserver, Source},
};
use crate::{
    census::{self, CensusReport},
    client::{AgentClient, Caller, is_refusal},
    format, holders,
    model::{OomKill, ProcessInfo},
    observer::config::ObserveArgs,
    sites::Site,
};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// pymem agent to read from [default: http://127.0.0.1:9477, and when
    /// no agent answers there, observe from this process (root)].
    /// A protected agent (--web-config-file) takes https:// and basic auth
    /// credentials from PYMEM_AGENT_USER and PYMEM_AGENT_PASSWORD (better
    /// for the password than https://USER:PASS@HOST:PORT, which `ps`
    /// shows).
    #[arg(long, value_name = "URL")]
    pub agent: Option<String>,
    #[command(flatten)]
    pub ca: crate::cli::AgentCaFile,
    /// Observe from this process even if an agent is running.
    #[arg(long, conflicts_with = "agent")]
    pub embedded: bool,
    /// Order of the rows.
    #[arg(long, value_enum, default_value_t = SortKey::Growth)]
    pub sort: SortKey,
    /// Show only processes whose command line contains this (any case).
    #[arg(
        long,
        value_name = "SUBSTR",
        default_value = "",
        hide_default_value = true
    )]
    pub filter: String,
    /// How often the view refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Print one snapshot as a plain table and exit (for scripts).
    #[arg(long)]
    pub once: bool,
    /// With --once: print the processes as JSON (as /api/v1/processes;
    /// post-mortems of OOM kills are at /api/v1/oom-kills).
    #[arg(long, requires = "once")]
    pub json: bool,
    #[command(
        flatten,
        next_help_heading = "Embedded observer (when no agent answers)"
    )]
    pub observe: ObserveArgs,
}

pub fn run(args: TopArgs) -> Result<()> {
    quiet_logging(args.once);
    let source = connect(&args)?;
    if args.once {
        if let Source::Embedded(observer) = &source {
            eprintln!("pymem top: no agent answered; observing from this process");
            observer.wait_until_sampled();
        }
        print_once(&source, &args)
    } else {
        run_tui(source, &args)
    }
}

/// Log lines would tear the full-screen view: none while it is up, and
/// only warnings before a `--once` print (unless RUST_LOG asks for more).
fn quiet_logging(once: bool) {
    if !once {
        log::set_max_level(log::LevelFilter::Off);
    } else if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The agent at `--agent` (which must answer), else the default agent if
/// it answers, else an embedded observer.
fn connect(args: &TopArgs) -> Result<Source> {
    if args.embedded {
        return start_embedded(args);
    }
    let target = args.ca.target(args.agent.as_deref());
    let agent = AgentClient::new(target, Caller::View)?;
    let url = agent.base_url().to_string();
    match agent.processes() {
        Ok(_) => Ok(Source::Agent(agent)),
        // An agent that wants credentials or another CA says so itself.
        Err(e) if is_refusal(&e) => Err(e),
        Err(e) if args.agent.is_some() => {
            Err(e.context(format!("no pymem agent answered at {url}")))
        }
        Err(_) => start_embedded(args).with_context(|| {
            format!("no pymem agent answered at {url}, and observing from this process failed")
        }),
    }
}

fn start_embedded(args: &TopArgs) -> Result<Source> {
    let observer = EmbeddedObserver::start(args.observe.observer_config())?;
    Ok(Source::Embedded(observer))
}

fn print_once(source: &Source, args: &TopArgs) -> Result<()> {
    let processes = source.fetch()?;
    let shown = app::select(&processes, args.sort, &args.filter);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &shown)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", plain_table(&shown))?;
        // An agent without the route has none to show.
        let kills = source.oom_kills().unwrap_or_default();
        write!(
            out,
            "{}",
            plain_oom_kills(&kills, census::unix_seconds_now())
        )?;
    }
    Ok(())
}

/// Post-mortems `--once` lists under the table.
const OOM_KILLS_PRINTED: usize = 5;

/// The latest OOM kills, one line each, after a blank line; nothing when
/// there are none.
fn plain_oom_kills(kills: &[OomKill], now: f64) -> String {
    let mut text = String::new();
    if kills.is_empty() {
        return text;
    }
    text.push_str("\nOOM KILLS (newest first)\n");
    for kill in kills.iter().take(OOM_KILLS_PRINTED) {
        text.push_str(&ui::oom_kill_summary(kill, now));
        text.push('\n');
    }
    text
}

/// The processes as an aligned text table without colours.
fn plain_table(processes: &[&ProcessInfo]) -> String {
    let mut table = format!(
        "{:>8}  {:<40}  {:<7}  {:>11}  {:>11}  {:>15}  {}\n",
        "PID", "COMMAND", "PYTHON", "HEAP", "RSS", "GROWTH", "LEAK"
    );
    for p in processes {
        let line = format!(
            "{:>8}  {:<40}  {:<7}  {:>11}  {:>11}  {:>15}  {}",
            p.pid,
            text::truncate(&text::short_command(ui::command(p)), 40),
            p.python_version,
            format::bytes(p.heap_bytes),
            format::bytes(p.rss_bytes),
            format::rate_per_minute(p.growth_bytes_per_second),
            if p.leak_suspected { "LEAK" } else { "" },
        );
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

/// Everything the render loop reacts to.
enum Event {
    Key(KeyEvent),
    Resize,
    Data(Result<Vec<ProcessInfo>, String>),
    /// Post-mortems of processes killed for memory.
    OomKills(Result<Vec<OomKill>, String>),
    /// The allocation sites of one process.
    Sites(u32, Result<Vec<Site>, String>),
    /// The object census of one process (boxed: a census is far bigger
    /// than the other events).
    Types(u32, Box<Result<CensusReport, String>>),
}

/// What the data thread fetches besides the processes: the sites of this
/// pid (the detail view's), or none.
type SitesWanted = Option<u32>;

fn run_tui(source: Source, args: &TopArgs) -> Result<()> {
    let mut app = App::new(source.describe(), args.sort, args.filter.clone());
    let source = Arc::new(source);
    let (events_tx, events_rx) = mpsc::channel();
    // Dropping `wanted` stops the data thread, and the census thread after
    // it.
    let (wanted, wanted_rx) = mpsc::channel::<SitesWanted>();
    let input_running = Arc::new(AtomicBool::new(true));
    // A floor on the interval: refreshing faster only burns CPU.
    let interval = args.interval.max(Duration::from_millis(100));
    let data = spawn_data_thread(source.clone(), interval, events_tx.clone(), wanted_rx)?;
    let input = spawn_input_thread(events_tx, input_running.clone())?;

    // Raw mode + alternate screen, and a panic hook that restores both.
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    exit_on_any_panic();
    let result = event_loop(&mut terminal, &mut app, &events_rx, &wanted);
    ratatui::restore();

    input_running.store(false, Ordering::Relaxed);
    drop(wanted);
    if let Ok(census) = data.join() {
        // A census under way (queued behind another process's) is not
        // waited for long: quitting is not held up by a heap being parsed.
        let deadline = Instant::now() + CENSUS_AT_EXIT;
        while !census.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if census.is_finished() {
            let _ = census.join();
        }
    }
    let _ = input.join();
    // The last holder of the source drops it: an embedded observer detaches
    // its probes before we exit (if a census thread still holds it, the
    // kernel closes its links at exit).
    drop(source);
    result
}

/// How long quitting waits for a census under way.
const CENSUS_AT_EXIT: Duration = Duration::from_secs(1);

/// ratatui's hook restores the terminal on a panic in any thread, but a
/// panic off the main thread (data, embedded observer) would leave this
/// loop drawing on the restored screen: end the program instead.
fn exit_on_any_panic() {
    let restore_and_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_and_report(info);
        std::process::exit(101);
    }));
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    events: &mpsc::Receiver<Event>,
    wanted: &mpsc::Sender<SitesWanted>,
) -> Result<()> {
    let mut asked: SitesWanted = None;
    loop {
        terminal.draw(|frame| ui::render(frame, app))?;
        match events.recv().context("event threads stopped")? {
            Event::Key(key) => app.on_key(key),
            Event::Resize => {} // the next draw uses the new size
            Event::Data(data) => app.on_data(data),
            Event::OomKills(kills) => app.on_oom_kills(kills),
            Event::Sites(pid, sites) => app.on_sites(pid, sites),
            Event::Types(pid, types) => app.on_types(pid, *types),
        }
        if app.should_quit {
            return Ok(());
        }
        if app.sites_wanted() != asked {
            asked = app.sites_wanted();
            // The data thread only ends after this loop (or with a panic,
            // which exits): nothing to handle if it is gone.
            let _ = wanted.send(asked);
        }
    }
}

/// Fetches from `source` every `interval`: the processes, then the sites
/// of the process `wanted` last named (at most once per refresh) from
/// allocation samples, until the census thread it starts has that
/// process's sites by heap state. A newly wanted process refreshes at once;
/// dropping `wanted`'s sender stops it, and it returns the census thread.
fn spawn_data_thread(
    source: Arc<Source>,
    interval: Duration,
    events: mpsc::Sender<Event>,
    wanted: mpsc::Receiver<SitesWanted>,
) -> Result<JoinHandle<JoinHandle<()>>> {
    let heap_sites_of = Arc::new(AtomicU32::new(0));
    let (census_wanted, census_wanted_rx) = mpsc::channel::<SitesWanted>();
    let census = spawn_census_thread(
        source.clone(),
        interval,
        events.clone(),
        census_wanted_rx,
        heap_sites_of.clone(),
    )?;
    let thread = std::thread::Builder::new()
        .name("pymem-top-data".into())
        .spawn(move || {
            let mut sites_of: SitesWanted = None;
            let mut next_refresh = Instant::now();
            loop {
                let wait = next_refresh.saturating_duration_since(Instant::now());
                match wanted.recv_timeout(wait) {
                    Ok(pid) => {
                        if pid.is_some() && pid != sites_of {
                            next_refresh = Instant::now();
                        }
                        sites_of = pid;
                        let _ = census_wanted.send(pid);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                next_refresh = Instant::now() + interval;
                let sampled = sites_of.filter(|&pid| heap_sites_of.load(Ordering::Relaxed) != pid);
                if !refresh(&source, sampled, &events) {
                    break;
                }
            }
            census
        })?;
    Ok(thread)
}

/// What pauses the process, on a thread of its own so that a census queued
/// behind another (one at a time agent-wide) holds up neither the process
/// list nor quitting: the sites by heap state of the wanted process every
/// `interval` (the agent reuses a census up to `SITES_CENSUS_AGE` old),
/// noted in `heap_sites_of` once they come, and its types every
/// `CENSUS_EVERY`.
fn spawn_census_thread(
    source: Arc<Source>,
    interval: Duration,
    events: mpsc::Sender<Event>,
    wanted: mpsc::Receiver<SitesWanted>,
    heap_sites_of: Arc<AtomicU32>,
) -> Result<JoinHandle<()>> {
    let thread = std::thread::Builder::new()
        .name("pymem-top-census".into())
        .spawn(move || {
            let mut of: SitesWanted = None;
            let mut next = Instant::now();
            let mut census = CensusSchedule::default();
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                match wanted.recv_timeout(wait) {
                    Ok(pid) => {
                        if pid != of {
                            heap_sites_of.store(0, Ordering::Relaxed);
                            next = Instant::now();
                            census = CensusSchedule::default();
                        }
                        of = pid;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                next = Instant::now() + interval;
                let Some(pid) = of else {
                    continue;
                };
                // Until they come (or if they fail) the data thread's sites
                // from allocation samples stay shown.
                if let Some(Ok(sites)) = source.heap_state_sites(pid) {
                    heap_sites_of.store(pid, Ordering::Relaxed);
                    if events.send(Event::Sites(pid, Ok(sites))).is_err() {
                        return;
                    }
                }
                if census.due(pid) {
                    let types = source
                        .census(pid, CENSUS_EVERY, true, TYPES_SHOWN)
                        .map(|mut report| {
                            // The detail view shows a few roots, no children.
                            holders::keep(&mut report.census.heap.holders, HOLDERS_SHOWN, 0);
                            report
                        })
                        .map_err(|e| format!("{e:#}"));
                    if events.send(Event::Types(pid, Box::new(types))).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(thread)
}

/// How often the detail view asks for an object census: each one pauses
/// the process while its heap is copied, so not at every refresh.
const CENSUS_EVERY: Duration = Duration::from_secs(60);
/// Types the detail view asks for (more than fit any block).
const TYPES_SHOWN: usize = 50;
/// Holders (roots) the detail view keeps of each census.
const HOLDERS_SHOWN: usize = 10;

/// When the detail view's process is due for its next census.
#[derive(Default)]
struct CensusSchedule {
    last: Option<(u32, Instant)>,
}

impl CensusSchedule {
    /// True (and noted) when `pid` had no census asked for in the last
    /// `CENSUS_EVERY`, or another process did.
    fn due(&mut self, pid: u32) -> bool {
        let due = match self.last {
            Some((last_pid, at)) => last_pid != pid || at.elapsed() >= CENSUS_EVERY,
            None => true,
        };
        if due {
            self.last = Some((pid, Instant::now()));
        }
        due
    }
}

/// One refresh: the processes and the post-mortems, then the sites of
/// `sites_of` from allocation samples (no census, no pause). False once
/// nobody listens any more.
fn refresh(source: &Source, sites_of: SitesWanted, events: &mpsc::Sender<Event>) -> bool {
    let data = source.fetch().map_err(|e| format!("{e:#}"));
    if events.send(Event::Data(data)).is_err() {
        return false;
    }
    let kills = source.oom_kills().map_err(|e| format!("{e:#}"));
    if events.send(Event::OomKills(kills)).is_err() {
        return false;
    }
    let Some(pid) = sites_of else {
        return true;
    };
    let sites = source.allocation_sites(pid).map_err(|e| format!("{e:#}"));
    events.send(Event::Sites(pid, sites)).is_ok()
}

/// Forwards key presses and resizes until `running` is cleared.
fn spawn_input_thread(
    events: mpsc::Sender<Event>,
    running: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let thread = std::thread::Builder::new()
        .name("pymem-top-input".into())
        .spawn(move || {
            // Polling with a timeout (not a blocking read) lets the thread
            // notice the quit and end.
            while running.load(Ordering::Relaxed) {
                let ready = match event::poll(Duration::from_millis(100)) {
                    Ok(ready) => ready,
                    Err(_) => return,
                };
                if !ready {
                    continue;
                }
                let forwarded = match event::read() {
                    Ok(event::Event::Key(key)) => Some(Event::Key(key)),
                    Ok(event::Event::Resize(..)) => Some(Event::Resize),
                    Ok(_) => None,
                    Err(_) => return,
                };
                if let Some(event) = forwarded
                    && events.send(event).is_err()
                {
                    return;
                }
            }
        })?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::app::tests::{sample_oom_kill, sample_processes};

    #[test]
    fn plain_table_is_sorted_filtered_and_uncoloured() {
        let processes = sample_processes();
        let shown = app::select(&processes, SortKey::Heap, "python3");
        let table = plain_table(&shown);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("     PID  COMMAND"), "{table}");
        assert!(
            lines[1].contains("http.server") && lines[1].contains("500.0 MiB"),
            "{table}"
        );
        assert!(
            lines[2].contains("worker.py") && lines[2].ends_with("LEAK"),
            "{table}"
        );
        assert!(!table.contains('\u{1b}'), "no escape codes");
        let filtered = app::select(&processes, SortKey::Heap, "batch");
        assert_eq!(plain_table(&filtered).lines().count(), 2);
    }

    #[test]
    fn once_lists_the_latest_oom_kills_under_the_table() {
        assert_eq!(plain_oom_kills(&[], 1000.0), "");
        let mut unlimited = sample_oom_kill(900.0);
        unlimited.memory_limit.limit_bytes = None;
        unlimited.top_sites.clear();
        let kills = vec![sample_oom_kill(990.0), unlimited];
        let text = plain_oom_kills(&kills, 1000.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "", "a blank line after the table: {text}");
        assert_eq!(lines[1], "OOM KILLS (newest first)");
        assert_eq!(
            lines[2],
            "OOM-killed 10s ago: pid 300 (python3 worker.py --queue jobs) heap 190.0 MiB, limit 200.0 MiB, top site /srv/worker.py:42"
        );
        assert!(
            lines[3].contains("1m 40s ago") && lines[3].ends_with("no known limit, no sites"),
            "{text}"
        );
        let many = vec![sample_oom_kill(990.0); 9];
        assert_eq!(
            plain_oom_kills(&many, 1000.0).lines().count(),
            2 + OOM_KILLS_PRINTED
        );
    }

    #[test]
    fn json_has_the_api_fields() {
        let processes = sample_processes();
        let shown = app::select(&processes, SortKey::Growth, "");
        let json: serde_json::Value = serde_json::to_value(&shown).unwrap();
        assert_eq!(json[0]["pid"], 300);
        assert_eq!(json[0]["leak_suspected"], true);
        assert!(json[0]["heap_history"].is_array());
    }
}
