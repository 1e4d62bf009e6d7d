//! The textbook leak as a service: Flask + pandas, `CACHE = {}` filled by
//! `/analyze` for every distinct request (tests/workloads/cache_service.py).
//! The holders must name `CACHE` with as many entries as distinct requests
//! were served and a retained size that agrees with the heap growth the
//! agent measured; with the `lru_cache(maxsize=100)` fix, the wrapper is
//! listed with its 100 entries and what it retains stays flat.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use pymem_agent::{
    cpython::heap::Holder,
    model::Accounting,
    sites::{Site, state::Attribution},
};

use crate::common::{
    Agent, OBSERVE_TIMEOUT, describe_sites, free_port, heap, pip_install_unless_importable, pyenv,
    source_line,
};

const SERVICE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/workloads/cache_service.py"
);

/// pyenv 3.11 with Flask and pandas.
fn python_with_flask_and_pandas() -> Option<PathBuf> {
    let python = pyenv("3.11")?;
    pip_install_unless_importable(&python, "flask, pandas", &["flask", "pandas"]).then_some(python)
}

/// The service, killed when dropped.
struct Service {
    child: Child,
    port: u16,
    http: ureq::Agent,
}

impl Service {
    fn start(python: &Path, fixed: bool) -> Service {
        let port = free_port();
        let mut command = Command::new(python);
        command
            .arg(SERVICE)
            .arg(port.to_string())
            .stdout(Stdio::piped());
        if fixed {
            command.arg("--fixed");
        }
        let mut child = command.spawn().expect("starting the service");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("\"port\""),
            "the service did not start: {line}"
        );
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let service = Service { child, port, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        while service.entries().is_none() {
            assert!(Instant::now() < deadline, "the service never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        service
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Requests `first..first + n`, each distinct: 100 rows of 4 columns.
    fn analyze(&self, first: u64, n: u64) {
        for i in first..first + n {
            let rows: Vec<serde_json::Value> = (0..100)
                .map(|j| serde_json::json!({"a": i, "b": j, "c": i * j, "d": i + j}))
                .collect();
            let body = serde_json::json!({"request": i, "rows": rows});
            self.http
                .post(&format!("http://127.0.0.1:{}/analyze", self.port))
                .send_json(&body)
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
        }
    }

    /// How many entries its cache holds, as the service itself counts.
    fn entries(&self) -> Option<u64> {
        let mut response = self
            .http
            .get(&format!("http://127.0.0.1:{}/stats", self.port))
            .call()
            .ok()?;
        let stats: serde_json::Value = response.body_mut().read_json().ok()?;
        stats["entries"].as_u64()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn holders(agent: &Agent, pid: u32) -> Vec<Holder> {
    agent.get_json(&format!(
        "/api/v1/processes/{pid}/holders?max_age=0&limit=10&depth=2"
    ))
}

fn named<'a>(holders: &'a [Holder], name: &str) -> &'a Holder {
    holders
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("{name} not among the holders: {holders:#?}"))
}

#[test]
fn cache_is_the_top_holder_of_the_textbook_leak() {
    let python = require!(
        python_with_flask_and_pandas(),
        "pyenv 3.11 with flask and pandas"
    );
    let agent = Agent::start(&[]);
    let service = Service::start(&python, false);
    agent.wait_for(service.pid(), OBSERVE_TIMEOUT);
    // Warm-up: imports and first-request caches settle.
    service.analyze(0, 30);
    let before = heap(&agent.settled(service.pid()));
    service.analyze(30, 1000);
    let after = heap(&agent.settled(service.pid()));
    let entries = service.entries().expect("the service's count");
    assert_eq!(entries, 1030);
    let growth = after - before;
    let holders = holders(&agent, service.pid());
    eprintln!("heap grew {growth:.0} B over 1000 requests; holders {holders:#?}");
    let cache = &holders[0];
    assert_eq!(cache.name, "__main__.CACHE", "{holders:#?}");
    assert_eq!(cache.length, Some(entries), "{cache:#?}");
    // CACHE also holds the 30 warm-up entries the growth leaves out.
    let per_thousand = cache.retained_bytes as f64 * 1000.0 / entries as f64;
    let error = (per_thousand - growth).abs() / growth;
    assert!(
        error <= 0.5,
        "CACHE retains {} B ({per_thousand:.0} per 1000 entries), the heap grew {growth:.0} B: {:.0}% apart",
        cache.retained_bytes,
        error * 100.0
    );
    eprintln!("CACHE retained vs heap growth: {:.1}% apart", error * 100.0);
}

#[test]
fn the_lru_cache_fix_is_listed_with_its_entries_and_stays_flat() {
    let python = require!(
        python_with_flask_and_pandas(),
        "pyenv 3.11 with flask and pandas"
    );
    let agent = Agent::start(&[]);
    let service = Service::start(&python, true);
    agent.wait_for(service.pid(), OBSERVE_TIMEOUT);
    service.analyze(0, 150);
    let before = heap(&agent.settled(service.pid()));
    let first = named(&holders(&agent, service.pid()), "__main__.cached_analysis").clone();
    service.analyze(150, 1000);
    let after = heap(&agent.settled(service.pid()));
    let second = named(&holders(&agent, service.pid()), "__main__.cached_analysis").clone();
    eprintln!(
        "heap {before:.0} -> {after:.0} B; wrapper {first:#?} -> retained {} B",
        second.retained_bytes
    );
    assert_eq!(service.entries(), Some(100));
    assert_eq!(first.type_name, "functools._lru_cache_wrapper");
    assert_eq!(first.length, Some(100), "{first:#?}");
    assert_eq!(second.length, Some(100), "{second:#?}");
    // Its 100 entries hold the results: what 1000 more would have cost
    // unbounded is ten times that.
    let per_entry = first.retained_bytes as f64 / 100.0;
    assert!(
        per_entry > 4096.0,
        "the entries' results are retained: {first:#?}"
    );
    let flat = (second.retained_bytes as f64 - first.retained_bytes as f64).abs();
    assert!(
        flat <= 0.3 * first.retained_bytes as f64,
        "{first:#?} -> {second:#?}"
    );
    // (The heap itself may still grow a little: evicted results are cyclic
    // garbage until the collector's next full pass.)
    eprintln!("heap grew {:.0} B over 1000 requests", after - before);
}

/// The same service as busy services run: over the probe budget (here a
/// small one), so the agent accounts its heap by syscalls and samples no
/// allocation in pymalloc. The sites still name the line that fills CACHE,
/// and the service's own lines hold most of the live site bytes.
#[test]
fn the_caching_line_is_the_top_site_under_syscall_accounting() {
    let python = require!(
        python_with_flask_and_pandas(),
        "pyenv 3.11 with flask and pandas"
    );
    let agent = Agent::start(&["--probe-budget", "100", "--probe-burst", "100"]);
    let service = Service::start(&python, false);
    agent.wait_for(service.pid(), OBSERVE_TIMEOUT);
    service.analyze(0, 1000);
    let process = agent.settled(service.pid());
    assert_eq!(process.accounting, Accounting::Syscalls, "{process:?}");
    let caching_line = source_line(SERVICE, "CACHE[key] = result", |l| {
        l.trim() == "CACHE[key] = result"
    });
    let report = agent.sites_report(service.pid());
    let samples = agent.sites(service.pid());
    let own = |sites: &[Site]| {
        let total: u64 = sites.iter().map(|s| s.bytes).sum();
        let own: u64 = sites
            .iter()
            .filter(|s| s.file.ends_with("cache_service.py"))
            .map(|s| s.bytes)
            .sum();
        own as f64 / total.max(1) as f64
    };
    let top = describe_sites(&report.sites, 5);
    eprintln!(
        "heap {} B; heap state: own lines {:.1}% of live site bytes; allocation samples: own lines {:.1}%; {top:#?}",
        heap(&process),
        own(&report.sites) * 100.0,
        own(&samples) * 100.0
    );
    assert_eq!(
        report.attribution,
        Attribution::HeapState,
        "{:?}",
        report.note
    );
    let first = &report.sites[0];
    assert!(
        first.file.ends_with("cache_service.py") && first.line == caching_line,
        "{top:#?}"
    );
    assert_eq!(first.holder.as_deref(), Some("__main__.CACHE"));
    assert!(own(&report.sites) >= 0.60, "{top:#?}");
}
