//! Allocation sites of one process over HTTP: JSON, a pprof profile and a
//! flame graph, all from one query to the observer.
use std::time::{SystemTime, UNIX_EPOCH};

use super::{AppState, not_observed};
use crate::{observer::Query, sites::Site};
use axum::{
    Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

/// The sites of `pid`, heaviest live bytes first, or the error response.
async fn query_sites(state: &AppState, pid: u32) -> Result<Vec<Site>, Response> {
    let stopped = || (StatusCode::SERVICE_UNAVAILABLE, "observer stopped\n").into_response();
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state
        .queries
        .send(Query::Sites { pid, reply })
        .await
        .is_err()
    {
        return Err(stopped());
    }
    match answer.await {
        Ok(Some(sites)) => Ok(sites),
        Ok(None) => Err(not_observed(pid)),
        Err(_) => Err(stopped()),
    }
}

/// `pid 4242 (python3, Python 3.11.7)`, or just the pid if the process left
/// the snapshot meanwhile.
fn describe(state: &AppState, pid: u32) -> String {
    match state.process(pid) {
        Some(p) => format!("pid {pid} ({}, Python {})", p.comm, p.python_version),
        None => format!("pid {pid}"),
    }
}

pub(super) async fn sites_json(State(state): State<AppState>, Path(pid): Path<u32>) -> Response {
    match query_sites(&state, pid).await {
        Ok(sites) => Json(sites).into_response(),
        Err(response) => response,
    }
}

/// `go tool pprof http://HOST:9477/api/v1/processes/PID/pprof`
pub(super) async fn sites_pprof(State(state): State<AppState>, Path(pid): Path<u32>) -> Response {
    let sites = match query_sites(&state, pid).await {
        Ok(sites) => sites,
        Err(response) => return response,
    };
    let comments = [format!(
        "pymem allocation sites of {}",
        describe(&state, pid)
    )];
    match crate::sites::pprof::encode(&sites, unix_nanos_now(), &comments) {
        Ok(profile) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            profile,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

pub(super) async fn sites_flamegraph(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
) -> Response {
    let sites = match query_sites(&state, pid).await {
        Ok(sites) => sites,
        Err(response) => return response,
    };
    let title = format!("{}: live bytes by allocation site", describe(&state, pid));
    match crate::sites::flamegraph::render_svg(&sites, &title) {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        // Nothing live yet: a client error of timing, not a server fault.
        Err(e) => (StatusCode::NOT_FOUND, format!("pid {pid}: {e:#}\n")).into_response(),
    }
}

fn unix_nanos_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
