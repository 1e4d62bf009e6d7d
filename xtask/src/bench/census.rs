//! `cargo xtask bench census`: what an object census costs, through a real
//! agent's API, for Python heaps of ~100 MiB and ~1 GiB: how long the
//! process is paused, copy and parse times, bytes copied, and the agent's
//! peak RSS (the copy lives in the agent while it is parsed).
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::{Bench, agent::RunningAgent, idle::status_kib, median};
use crate::{process::Supervised, workspace};

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(120);
/// A census of a GiB heap copies and walks a GiB.
const CENSUS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct CensusArgs {
    /// Heap sizes to measure, in MiB of live Python objects.
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1024])]
    heaps_mib: Vec<u64>,
    /// Censuses per heap (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One heap's censuses.
pub(super) struct HeapResult {
    pub(super) heap_mib: u64,
    pub(super) rss_kib: u64,
    /// Each census's JSON (`/census`), or the agent's error.
    pub(super) censuses: Vec<Result<(Value, Duration), String>>,
    pub(super) agent_peak_rss_kib: u64,
}

pub fn run(args: &CensusArgs, bench: &Bench) -> Result<()> {
    let python =
        test_interpreters::pyenv("3.11").context("no pyenv 3.11 under ~/.pyenv/versions")?;
    let workload = workload();
    let mut results = Vec::new();
    for &heap_mib in &args.heaps_mib {
        results.push(measure_heap(
            bench,
            &python,
            &workload,
            heap_mib,
            args.rounds,
        )?);
    }
    bench.write_results(
        "census",
        results_json(&python, &results),
        &results_markdown(&results),
    )
}

pub(super) fn measure_heap(
    bench: &Bench,
    python: &Path,
    workload: &Path,
    heap_mib: u64,
    rounds: usize,
) -> Result<HeapResult> {
    println!("building a ~{heap_mib} MiB heap in {}", python.display());
    let mut target = Supervised::spawn(
        Command::new(python)
            .arg("-u")
            .arg(workload)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
        "census workload",
        Duration::from_secs(5),
    )?;
    let child = target.child_mut();
    let mut stdin = child.stdin.take().context("workload stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("workload stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    writeln!(stdin, "bloat {heap_mib}")?;
    line.clear();
    stdout.read_line(&mut line)?;
    ensure!(line.contains("objects"), "workload answered {line:?}");
    let pid = target.pid();
    let rss_kib = status_kib(pid, "VmRSS")?;
    let agent_log = bench.results_dir()?.join("census-agent.log");
    fs::write(&agent_log, "")?;
    let mut agent = RunningAgent::start(&bench.agent_binary, &agent_log, &[])?;
    agent.wait_until_observed(&[pid], OBSERVE_TIMEOUT)?;
    let mut censuses = Vec::new();
    for round in 1..=rounds {
        let started = Instant::now();
        let answer = get(
            agent.addr(),
            &format!("/api/v1/processes/{pid}/census?limit=5"),
        );
        let took = started.elapsed();
        match &answer {
            Ok(census) => println!(
                "  census {round}: paused {:.3} s, copied {} bytes in {:.3} s, parsed in {:.3} s, {:.3} s in all",
                census["pause_seconds"].as_f64().unwrap_or(f64::NAN),
                census["copied_bytes"],
                census["copy_seconds"].as_f64().unwrap_or(f64::NAN),
                census["parse_seconds"].as_f64().unwrap_or(f64::NAN),
                took.as_secs_f64()
            ),
            Err(e) => println!("  census {round}: {e}"),
        }
        censuses.push(answer.map(|census| (census, took)));
    }
    let agent_peak_rss_kib = status_kib(agent.pid(), "VmHWM")?;
    agent.stop()?;
    drop(target);
    Ok(HeapResult {
        heap_mib,
        rss_kib,
        censuses,
        agent_peak_rss_kib,
    })
}

/// GET `path`'s JSON, or the agent's error (its status and body).
pub(super) fn get(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let fetch = || -> Result<(String, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(CENSUS_TIMEOUT))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP")?;
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    };
    let (status, body) = fetch().map_err(|e| format!("GET {path}: {e:#}"))?;
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))
}

/// Medians over the censuses that succeeded: pause, copy, parse, total
/// (seconds) and copied bytes.
pub(super) fn medians(result: &HeapResult) -> Option<[f64; 5]> {
    let ok: Vec<&(Value, Duration)> = result
        .censuses
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .collect();
    if ok.is_empty() {
        return None;
    }
    let field = |name: &str| -> f64 {
        median(
            &ok.iter()
                .map(|(c, _)| c[name].as_f64().unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        )
    };
    let total = median(&ok.iter().map(|(_, d)| d.as_secs_f64()).collect::<Vec<_>>());
    Some([
        field("pause_seconds"),
        field("copy_seconds"),
        field("parse_seconds"),
        total,
        field("copied_bytes"),
    ])
}

fn results_json(python: &Path, results: &[HeapResult]) -> Value {
    let heaps: Vec<Value> = results
        .iter()
        .map(|r| {
            let censuses: Vec<Value> = r
                .censuses
                .iter()
                .map(|c| match c {
                    Ok((census, took)) => json!({
                        "pause_seconds": census["pause_seconds"],
                        "copy_seconds": census["copy_seconds"],
                        "parse_seconds": census["parse_seconds"],
                        "total_seconds": took.as_secs_f64(),
                        "copied_bytes": census["copied_bytes"],
                        "objects": census["heap"]["objects"],
                        "consistency": census["consistency"],
                    }),
                    Err(e) => json!({"error": e}),
                })
                .collect();
            json!({
                "heap_mib": r.heap_mib,
                "workload_rss_kib": r.rss_kib,
                "agent_peak_rss_kib": r.agent_peak_rss_kib,
                "censuses": censuses,
            })
        })
        .collect();
    json!({"benchmark": "census", "python": python, "heaps": heaps})
}

fn results_markdown(results: &[HeapResult]) -> String {
    let mut md = String::from(
        "# Object census cost\n\nOne process (pyenv 3.11) with a heap of small objects, censused through the agent's `/api/v1/processes/PID/census`; medians.\n\n\
         | heap | workload RSS | pause | copy | parse | total | copied | agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let mib = |kib: u64| format!("{:.0} MiB", kib as f64 / 1024.0);
        match medians(r) {
            Some([pause, copy, parse, total, copied]) => md.push_str(&format!(
                "| ~{} MiB | {} | {pause:.3} s | {copy:.3} s | {parse:.3} s | {total:.3} s | {:.0} MiB | {} |\n",
                r.heap_mib,
                mib(r.rss_kib),
                copied / (1u64 << 20) as f64,
                mib(r.agent_peak_rss_kib)
            )),
            None => {
                let error = r
                    .censuses
                    .iter()
                    .find_map(|c| c.as_ref().err())
                    .map_or("no census", String::as_str);
                md.push_str(&format!(
                    "| ~{} MiB | {} | failed: {error} | | | | | {} |\n",
                    r.heap_mib,
                    mib(r.rss_kib),
                    mib(r.agent_peak_rss_kib)
                ));
            }
        }
    }
    md
}

/// The census workload (`bloat N` grows a heap of N MiB of small objects).
pub(super) fn workload() -> std::path::PathBuf {
    workspace::root().join("pymem-agent/tests/workloads/census.py")
}
