//! Just enough HTTP to read the agent's JSON API on loopback: one GET per
//! connection, HTTP/1.0 so the server sends a plain body and closes.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);

pub fn get_json(addr: SocketAddr, path: &str) -> Result<Value> {
    let body = get(addr, path).with_context(|| format!("GET http://{addr}{path}"))?;
    serde_json::from_str(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

/// A text answer, such as `/metrics`.
pub fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    get(addr, path).with_context(|| format!("GET http://{addr}{path}"))
}

fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status_line = head.lines().next().unwrap_or_default();
    ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "{status_line}"
    );
    Ok(body.to_owned())
}

/// The pids in a `/api/v1/processes` answer.
pub fn pids(processes: &Value) -> Vec<u32> {
    pids_where(processes, |_| true)
}

/// The pids whose start-up is over: the agent attaches a new process's
/// per-allocation probes only after `--probe-delay` (accounting `startup`
/// until then).
pub fn pids_past_startup(processes: &Value) -> Vec<u32> {
    pids_where(processes, |process| process["accounting"] != "startup")
}

/// The pids whose heap baseline is still to come (`since_attach`: no
/// census of what they held before the agent found them yet).
pub fn pids_without_baseline(processes: &Value) -> Vec<u32> {
    pids_where(processes, |process| {
        process["heap_baseline"] == "since_attach"
    })
}

fn pids_where(processes: &Value, keep: impl Fn(&Value) -> bool) -> Vec<u32> {
    processes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|process| keep(process))
        .filter_map(|process| process["pid"].as_u64())
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{pids, pids_past_startup, pids_without_baseline};

    #[test]
    fn pids_of_process_list() {
        let list = serde_json::json!([
            {"pid": 7, "accounting": "probes", "heap_baseline": "census"},
            {"pid": 8, "accounting": "startup", "heap_baseline": "since_attach"},
            {"pid": 9},
        ]);
        assert_eq!(pids(&list), vec![7, 8, 9]);
        assert_eq!(pids_past_startup(&list), vec![7, 9]);
        assert_eq!(pids_without_baseline(&list), vec![8]);
        assert!(pids(&serde_json::json!({"error": 1})).is_empty());
    }
}
