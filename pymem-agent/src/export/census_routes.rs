//! Object censuses over HTTP: `/types` (a list of types), `/holders` (a
//! list of what holds the memory) and `/census` (the whole census with its
//! timings), each from one query to the observer.
//!
//! `?max_age=SECONDS` accepts a census that recent instead of a fresh one
//! (default 0: always a fresh census, which pauses the process);
//! `?growth=1` adds `count_delta`/`bytes_delta` since the census before
//! (biggest count growth first); `?limit=N` keeps the first N types (or
//! holders). `/holders` also takes `?depth=N` (levels of children kept
//! under each root; default all) and `?report=1` (the holders with the
//! census's totals and warnings about them, as an object).
use std::time::Duration;

use axum::{
    Json,
    extract::{Path, Query as UrlQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::AppState;
use crate::{
    census::{CensusAnswer, CensusErrorBody, CensusFailure, CensusReport},
    holders::HoldersReport,
    observer::Query,
};

#[derive(Debug, Default, Deserialize)]
pub(super) struct CensusParams {
    #[serde(default)]
    max_age: Option<f64>,
    #[serde(default)]
    growth: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    depth: Option<usize>,
    #[serde(default)]
    report: Option<String>,
}

impl CensusParams {
    fn wants_growth(&self) -> bool {
        is_set(self.growth.as_deref())
    }

    fn wants_report(&self) -> bool {
        is_set(self.report.as_deref())
    }

    fn max_age(&self) -> Duration {
        max_age(self.max_age)
    }

    /// 0: every type.
    fn limit(&self) -> usize {
        self.limit.unwrap_or(0)
    }
}

/// `?flag=1`, `?flag=true`, `?flag=yes` or a bare `?flag`.
pub(super) fn is_set(flag: Option<&str>) -> bool {
    matches!(flag, Some("1" | "true" | "yes" | ""))
}

/// `?max_age=SECONDS`: absent, zero, negative or not a number is 0 (a
/// fresh census).
pub(super) fn max_age(seconds: Option<f64>) -> Duration {
    seconds
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.min(1e9)))
}

/// A census of `pid` no older than `max_age` from the observer; None when
/// no answer comes (the observer stopped, or dropped the request).
pub(super) async fn ask_census(
    state: &AppState,
    pid: u32,
    max_age: Duration,
) -> Option<Result<CensusAnswer, CensusFailure>> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let query = Query::Census {
        pid,
        max_age,
        reply,
    };
    state.queries.send(query).await.ok()?;
    answer.await.ok()
}

fn error(status: StatusCode, pid: u32, message: String, unsupported: bool) -> Response {
    let body = CensusErrorBody {
        error: message,
        pid,
        unsupported,
    };
    (status, Json(body)).into_response()
}

async fn query_census(
    state: &AppState,
    pid: u32,
    params: &CensusParams,
) -> Result<CensusAnswer, Response> {
    let stopped = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            pid,
            "observer stopped".into(),
            false,
        )
    };
    match ask_census(state, pid, params.max_age()).await {
        Some(Ok(answer)) => Ok(answer),
        Some(Err(CensusFailure::NotObserved)) => Err(error(
            StatusCode::NOT_FOUND,
            pid,
            format!("pid {pid} is not observed"),
            false,
        )),
        // The request is fine; this server cannot fulfil it for this build.
        Some(Err(CensusFailure::Unsupported(reason))) => Err(error(
            StatusCode::NOT_IMPLEMENTED,
            pid,
            format!("no object census of pid {pid}: {reason}"),
            true,
        )),
        Some(Err(CensusFailure::Failed(reason))) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            pid,
            format!("the object census of pid {pid} failed: {reason}"),
            false,
        )),
        None => Err(stopped()),
    }
}

/// `GET /api/v1/processes/{pid}/types`: `[{type, count, bytes}]`, heaviest
/// first; with `?growth=1` biggest count growth first, with deltas.
pub(super) async fn types(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
    UrlQuery(params): UrlQuery<CensusParams>,
) -> Response {
    let answer = match query_census(&state, pid, &params).await {
        Ok(answer) => answer,
        Err(response) => return response,
    };
    let report = CensusReport::new(&answer, params.wants_growth(), params.limit());
    Json(report.rows(params.wants_growth())).into_response()
}

/// `GET /api/v1/processes/{pid}/census`: the whole census (consistency,
/// timings, totals, types) as a [`CensusReport`].
pub(super) async fn census(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
    UrlQuery(params): UrlQuery<CensusParams>,
) -> Response {
    match query_census(&state, pid, &params).await {
        Ok(answer) => Json(CensusReport::new(
            &answer,
            params.wants_growth(),
            params.limit(),
        ))
        .into_response(),
        Err(response) => response,
    }
}

/// `GET /api/v1/processes/{pid}/holders`: `[{name, type, length, count,
/// retained_bytes, deep_bytes, children}]`, heaviest retained first; with
/// `?report=1` a [`HoldersReport`] (the census, `roots`, the holders and
/// `reachable_bytes`, `unreachable_bytes`, `opaque_types`, `warnings`).
pub(super) async fn holders(
    State(state): State<AppState>,
    Path(pid): Path<u32>,
    UrlQuery(params): UrlQuery<CensusParams>,
) -> Response {
    let answer = match query_census(&state, pid, &params).await {
        Ok(answer) => answer,
        Err(response) => return response,
    };
    let report = HoldersReport::new(&answer.latest, params.limit(), params.depth);
    if params.wants_report() {
        Json(report).into_response()
    } else {
        Json(report.holders.holders).into_response()
    }
}
