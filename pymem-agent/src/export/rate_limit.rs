//! Per-client rate limits on the routes that make the agent work (object
//! censuses pause the target; symbolising sites costs CPU): a token bucket
//! per peer IP address, a bounded number of them, and 429 with
//! `Retry-After` when a client's bucket is empty.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::listener::Peer;

/// Clients tracked at once; past it, the client idle longest is forgotten
/// (which can only make a limit more lenient, never refuse someone new).
const MAX_CLIENTS: usize = 4096;

/// `--rate-limit` and `--rate-limit-burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests per second a client gets back.
    pub per_second: f64,
    /// Requests a client may make at once.
    pub burst: u32,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// None when `limit` is off (a rate of 0).
    pub fn new(limit: RateLimit) -> Option<Arc<Self>> {
        (limit.per_second > 0.0 && limit.burst > 0).then(|| {
            Arc::new(Self {
                limit,
                buckets: Mutex::new(HashMap::new()),
            })
        })
    }

    /// Takes a token of `client`'s at `now`, or says how long until one.
    fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.limit.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            let idlest = buckets
                .iter()
                .min_by_key(|(_, bucket)| bucket.updated)
                .map(|(ip, _)| *ip);
            if let Some(ip) = idlest {
                buckets.remove(&ip);
            }
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.limit.per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.limit.per_second,
            ))
        }
    }
}

/// Middleware for the working routes.
pub(super) async fn limit_rate(
    State(limiter): State<Arc<RateLimiter>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    match limiter.take(peer.0.ip(), Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many requests from {}: at most {} per second (burst {}) on this route; retry in {seconds} s\n",
                    peer.0.ip(),
                    limiter.limit.per_second,
                    limiter.limit.burst
                ),
            )
                .into_response();
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_the_rate_and_others_are_not_affected() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        })
        .unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(a, t0).is_ok());
        }
        let wait = limiter.take(a, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(limiter.take(b, t0).is_ok());
        // Half a second later one token is back, and only one.
        let later = t0 + Duration::from_millis(500);
        assert!(limiter.take(a, later).is_ok());
        assert!(limiter.take(a, later).is_err());
    }

    #[test]
    fn the_clients_tracked_are_bounded() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 1,
        })
        .unwrap();
        let now = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert!(limiter.take(ip, now).is_ok());
        }
        assert_eq!(limiter.buckets.lock().unwrap().len(), MAX_CLIENTS);
        assert!(
            RateLimiter::new(RateLimit {
                per_second: 0.0,
                burst: 5
            })
            .is_none()
        );
    }
}
