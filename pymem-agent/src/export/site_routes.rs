//! Allocation sites of one process over HTTP: JSON, a pprof profile and a
//! flame graph, all from one query to the observer.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{AppState, census_routes, not_observed};
use crate::{
    census::CensusFailure,
    observer::Query,
    sites::{
        self, Site,
        keys::GroupBy,
        state::{Attribution, SitesReport},
    },
};
use axum::{
    Json,
    extract::{Path, Query as UrlQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;

/// `?attribution=auto|heap_state|allocation_samples` (default auto: heap
/// state when a census can be had, samples otherwise), `?max_age=SECONDS`
/// (a census that recent is reused; default 0, a fresh one, which pauses
/// the process), `?group_by=app|lineno|function|file|traceback` (default
/// app: the innermost frame of the application's own code), `?report=1`
/// (the sites with how they were attributed).
#[derive(Debug, Default, Deserialize)]
pub(super) struct SitesParams {
    #[serde(default)]
    attribution: Option<String>,
    #[serde(default)]
    max_age: Option<f64>,
    #[serde(default)]
    report: Option<String>,
    /// `app` (default), `lineno`, `function`, `file`, `traceback`.
    #[serde(default)]
    group_by: Option<GroupBy>,
}

impl SitesParams {
    fn max_age(&self) -> Duration {
        census_routes::max_age(self.max_age)
    }
}

fn stopped() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "observer stopped\n").into_response()
}

/// The allocation-sample sites of `pid`, heaviest live bytes first.
async fn sampled_sites(state: &AppState, pid: u32) -> Result<Vec<Site>, Response> {
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

/// The sites of `pid` and how they were attributed, grouped as asked, or
/// the error response.
async fn query_sites(
    state: &AppState,
    pid: u32,
    params: &SitesParams,
) -> Result<SitesReport, Response> {
    let mut report = attributed_sites(state, pid, params).await?;
    report.sites = sites::keys::regroup(&report.sites, params.group_by.unwrap_or_default());
    Ok(report)
}

async fn attributed_sites(
    state: &AppState,
    pid: u32,
    params: &SitesParams,
) -> Result<SitesReport, Response> {
    let samples = |note: String, sites: Vec<Site>| SitesReport {
        pid,
        attribution: Attribution::AllocationSamples,
        note: Some(note),
        census_taken_at: None,
        unheld_bytes: None,
        sites,
    };
    match params.attribution.as_deref() {
        None | Some("" | "auto" | "heap_state") => {}
        Some("allocation_samples") => {
            let sites = sampled_sites(state, pid).await?;
            return Ok(samples(
                "asked for (?attribution=allocation_samples)".into(),
                sites,
            ));
        }
        Some(other) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("attribution is auto, heap_state or allocation_samples, not {other:?}\n"),
            )
                .into_response());
        }
    }
    let census = match census_routes::ask_census(state, pid, params.max_age()).await {
        Some(Ok(answer)) => {
            let census = answer.latest;
            sites::state::usable(&census).map(|()| census)
        }
        Some(Err(CensusFailure::NotObserved)) => return Err(not_observed(pid)),
        Some(Err(CensusFailure::Unsupported(reason))) => Err(format!("no object census: {reason}")),
        Some(Err(CensusFailure::Failed(reason))) => {
            Err(format!("the object census failed: {reason}"))
        }
        // No answer: the samples may still be had (and if the observer is
        // gone, asking for them says so).
        None => Err("the object census was abandoned".into()),
    };
    match census {
        Ok(census) => {
            let mut by_state = sites::state::from_census(&census);
            sites::state::with_callers(&mut by_state, &sampled_sites(state, pid).await?);
            Ok(SitesReport {
                pid,
                attribution: Attribution::HeapState,
                note: sites::state::damage_note(&census),
                census_taken_at: Some(census.taken_at),
                unheld_bytes: Some(sites::state::unheld_bytes(&census)),
                sites: by_state,
            })
        }
        Err(reason) => {
            let sites = sampled_sites(state, pid).await?;
            Ok(samples(
                format!(
                    "{reason}; allocation samples favour code that allocates often over code that keeps memory"
                ),
                sites,
            ))
        }
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

pub(super) async fn sites_json(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
    UrlQuery(params): UrlQuery<SitesParams>,
) -> Response {
    let report = census_routes::is_set(params.report.as_deref());
    match query_sites(&state, pid, &params).await {
        Ok(answer) if report => Json(answer).into_response(),
        Ok(answer) => Json(answer.sites).into_response(),
        Err(response) => response,
    }
}

/// `go tool pprof http://HOST:9477/api/v1/processes/PID/pprof`
pub(super) async fn sites_pprof(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
    UrlQuery(params): UrlQuery<SitesParams>,
) -> Response {
    let sites = match query_sites(&state, pid, &params).await {
        Ok(answer) => answer.sites,
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
    UrlQuery(params): UrlQuery<SitesParams>,
) -> Response {
    let sites = match query_sites(&state, pid, &params).await {
        Ok(answer) => answer.sites,
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
