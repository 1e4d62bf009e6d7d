//! Exporters: Prometheus metrics and the JSON API, both rendered from the
//! observer's latest snapshot, served by one HTTP server.
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use axum::{
    Router,
    http::StatusCode,
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    model::ProcessInfo,
    observer::{QuerySender, SharedSnapshot},
};

mod api;
mod auth;
mod census_routes;
mod listener;
mod metrics;
mod rate_limit;
mod site_routes;
mod web_config;

pub(crate) use self::web_config::pem_certificates;
pub use self::{
    listener::AgentListener,
    metrics::{DEFAULT_LABELS, ProcessLabel, render_metrics},
    rate_limit::RateLimit,
    web_config::WebConfig,
};

/// The agent's default address: loopback only; expose it deliberately.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

#[derive(Clone)]
struct AppState {
    snapshot: SharedSnapshot,
    queries: QuerySender,
    labels: Vec<ProcessLabel>,
}

impl AppState {
    /// `pid`'s entry in the latest snapshot.
    fn process(&self, pid: u32) -> Option<ProcessInfo> {
        let snapshot = self.snapshot.read().expect("snapshot");
        snapshot.processes.iter().find(|p| p.pid == pid).cloned()
    }
}

/// The answer for a pid the observer does not know.
fn not_observed(pid: u32) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("pid {pid} is not observed\n"),
    )
        .into_response()
}

/// Binds first, so a busy port is a clear startup error, then serves until
/// the returned future is dropped.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another pymem agent running? use --listen)")
    })
}

/// Who may use the server and how much: `--web-config-file` (TLS, users)
/// and `--rate-limit`.
pub struct Protection {
    pub web: WebConfig,
    /// On the routes that make the agent work; None: unlimited.
    pub rate_limit: Option<RateLimit>,
}

pub async fn serve(
    listener: AgentListener,
    snapshot: SharedSnapshot,
    queries: QuerySender,
    labels: Vec<ProcessLabel>,
    protection: Protection,
) -> Result<()> {
    let state = AppState {
        snapshot,
        queries,
        labels,
    };
    // Censuses (which pause the target) and symbolised sites: the work a
    // client can ask for, and so what is rate-limited.
    let mut working = Router::new()
        .route(
            "/api/v1/processes/{pid}/sites",
            get(site_routes::sites_json),
        )
        .route(
            "/api/v1/processes/{pid}/pprof",
            get(site_routes::sites_pprof),
        )
        .route("/api/v1/processes/{pid}/types", get(census_routes::types))
        .route("/api/v1/processes/{pid}/census", get(census_routes::census))
        .route(
            "/api/v1/processes/{pid}/holders",
            get(census_routes::holders),
        )
        .route(
            "/api/v1/processes/{pid}/flamegraph.svg",
            get(site_routes::sites_flamegraph),
        );
    if let Some(limiter) = protection.rate_limit.and_then(rate_limit::RateLimiter::new) {
        working = working.route_layer(from_fn_with_state(limiter, rate_limit::limit_rate));
    }
    let mut app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics::exposition))
        .route("/api/v1/processes", get(api::processes))
        .route("/api/v1/processes/{pid}", get(api::process))
        .route("/api/v1/oom-kills", get(api::oom_kills))
        .merge(working);
    if let Some(users) = auth::BasicAuth::new(protection.web.users) {
        app = app.layer(from_fn_with_state(users, auth::require_auth));
    }
    // Liveness needs no credentials (kubelet's probes have none) and says
    // nothing but "ok".
    let app = app
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<listener::Peer>(),
    )
    .await
    .context("HTTP server")
}

async fn index() -> &'static str {
    "pymem agent\n\n/metrics                            Prometheus metrics\n/api/v1/processes                   observed Python processes (JSON)\n/api/v1/processes/N                 one process\n/api/v1/processes/N/sites           which lines hold the memory (JSON; ?attribution=auto|heap_state|allocation_samples&max_age=S&report=1)\n/api/v1/processes/N/pprof           the same as a pprof profile (gzip profile.proto)\n/api/v1/processes/N/flamegraph.svg  a flame graph of their live bytes\n/api/v1/processes/N/types           object census: live objects by type (JSON; ?growth=1&limit=N&max_age=S)\n/api/v1/processes/N/holders         what holds the memory: roots by retained size (JSON; ?limit=N&depth=N&max_age=S&report=1)\n/api/v1/processes/N/census          the same census with its timings and totals\n/api/v1/oom-kills                   post-mortems of Python processes the kernel killed for memory, newest first (JSON)\n/healthz                            liveness\n"
}

/// Parses the `--listen` value: `HOST:PORT`, or a bare port on 127.0.0.1.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|e| format!("{value:?} is not HOST:PORT: {e}"))
}
