//! A pre-fork server as production runs it: gunicorn with four sync
//! workers (tests/workloads/gunicorn_app.py), two of them caching every
//! request. Every worker is observed; in each caching worker the app's
//! caching line is the top site with most of the live bytes; in the
//! others no app line holds anything to speak of.
use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use pymem_agent::sites::state::Attribution;

use crate::common::{
    Agent, OBSERVE_TIMEOUT, describe_sites, free_port, pip_install_unless_importable, pyenv,
    source_line,
};

const WORKLOADS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads");

fn app_file() -> String {
    format!("{WORKLOADS}/gunicorn_app.py")
}

/// pyenv 3.11 with Flask and gunicorn.
fn python_with_gunicorn() -> Option<PathBuf> {
    let python = pyenv("3.11")?;
    pip_install_unless_importable(&python, "flask, gunicorn", &["flask", "gunicorn"])
        .then_some(python)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn each_caching_worker_names_the_caching_line() {
    let python = require!(python_with_gunicorn(), "pyenv 3.11 with flask and gunicorn");
    let agent = Agent::start(&[]);
    let port = free_port();
    let server = Server(
        Command::new(&python)
            .args(["-m", "gunicorn", "--chdir", WORKLOADS, "-c"])
            .arg(format!("{WORKLOADS}/gunicorn_conf.py"))
            .args(["-b", &format!("127.0.0.1:{port}"), "gunicorn_app:app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting gunicorn"),
    );
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let get = |n: u32| -> Option<serde_json::Value> {
        http.get(&format!("http://127.0.0.1:{port}/item/{n}"))
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(0).is_none() {
        assert!(Instant::now() < deadline, "gunicorn never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ground truth from the workers themselves: who caches, how much.
    let mut workers: HashMap<u32, (bool, u64)> = HashMap::new();
    for n in 1..=4000 {
        let answer = get(n).unwrap_or_else(|| panic!("request {n} failed"));
        let pid = answer["pid"].as_u64().unwrap() as u32;
        workers.insert(
            pid,
            (
                answer["leaky"].as_bool().unwrap(),
                answer["entries"].as_u64().unwrap(),
            ),
        );
    }
    assert_eq!(workers.len(), 4, "{workers:?}");
    let cache_line = source_line(&app_file(), "SITE: cache", |l| l.ends_with("# SITE: cache"));
    let mut leaky = 0;
    for (&pid, &(caches, entries)) in &workers {
        agent.wait_for(pid, OBSERVE_TIMEOUT);
        let report = agent.sites_report(pid);
        assert_eq!(
            report.attribution,
            Attribution::HeapState,
            "{:?}",
            report.note
        );
        let total: u64 = report.sites.iter().map(|s| s.bytes).sum();
        let app: Vec<_> = report
            .sites
            .iter()
            .filter(|s| s.file.ends_with("gunicorn_app.py"))
            .collect();
        let top = describe_sites(&report.sites, 4);
        eprintln!("worker {pid} caches={caches} entries={entries}: {total} B in sites; {top:#?}");
        if caches {
            leaky += 1;
            let first = &report.sites[0];
            assert!(
                first.file.ends_with("gunicorn_app.py") && first.line == cache_line,
                "worker {pid}: {top:#?}"
            );
            let share = first.bytes as f64 / total as f64;
            assert!(
                share >= 0.70,
                "worker {pid}: caching line {share:.3}: {top:#?}"
            );
            // Its size: what the worker's own count says it keeps (each
            // page a ~20 KB str and a small dict).
            assert!(
                first.bytes >= entries * 20_000,
                "worker {pid}: {} B for {entries} entries",
                first.bytes
            );
        } else {
            assert_eq!(entries, 0);
            let held: u64 = app.iter().map(|s| s.bytes).sum();
            assert!(
                held < 64 << 10,
                "worker {pid}: app lines hold {held} B: {top:#?}"
            );
        }
    }
    assert_eq!(leaky, 2, "{workers:?}");
    drop(server);
}
