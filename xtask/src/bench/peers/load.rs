//! A closed-loop HTTP load generator for the Flask workload: `clients`
//! threads, each sending one request at a time (HTTP/1.0, a connection per
//! request) to 127.0.0.1 for a fixed duration, recording each latency.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::super::median;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "requests_per_second": self.requests_per_second(),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        })
    }
}

pub fn drive(port: u16, clients: usize, duration: Duration) -> Result<LoadResult> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            thread::spawn(move || {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let mut n = client as u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match request(addr, n) {
                        Ok(()) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                    n += clients as u64;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (l, e) = worker.join().expect("load client panicked");
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        !latencies.is_empty(),
        "no request to 127.0.0.1:{port} succeeded ({errors} errors)"
    );
    Ok(LoadResult {
        requests: latencies.len() as u64,
        errors,
        seconds,
        p50_ms: median(&latencies),
        p99_ms: quantile(&latencies, 0.99),
    })
}

fn request(addr: SocketAddr, user: u64) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "GET /orders/{} HTTP/1.0\r\nHost: {addr}\r\n\r\n",
        user % 10_000
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    ensure!(
        response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"),
        "not 200"
    );
    Ok(())
}

/// The `q` quantile (nearest rank) of `values`.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&[5.0, 1.0], 0.99), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
