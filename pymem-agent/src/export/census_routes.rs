//! Object censuses over HTTP: `/types` (a list of types) and `/census`
//! (the whole census with its timings), both from one query to the
//! observer.
//!
//! `?max_age=SECONDS` accepts a census that recent instead of a fresh one
//! (default 0: always a fresh census, which pauses the process);
//! `?growth=1` adds `count_delta`/`bytes_delta` since the census before
//! (biggest count growth first); `?limit=N` keeps the first N types.
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
}

impl CensusParams {
    fn wants_growth(&self) -> bool {
        matches!(self.growth.as_deref(), Some("1" | "true" | "yes" | ""))
    }

    fn max_age(&self) -> Duration {
        self.max_age
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.min(1e9)))
    }

    /// 0: every type.
    fn limit(&self) -> usize {
        self.limit.unwrap_or(0)
    }
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
    let (reply, answer) = tokio::sync::oneshot::channel();
    let query = Query::Census {
        pid,
        max_age: params.max_age(),
        reply,
    };
    if state.queries.send(query).await.is_err() {
        return Err(stopped());
    }
    match answer.await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(CensusFailure::NotObserved)) => Err(error(
            StatusCode::NOT_FOUND,
            pid,
            format!("pid {pid} is not observed"),
            false,
        )),
        // The request is fine; this server cannot fulfil it for this build.
        Ok(Err(CensusFailure::Unsupported(reason))) => Err(error(
            StatusCode::NOT_IMPLEMENTED,
            pid,
            format!("no object census of pid {pid}: {reason}"),
            true,
        )),
        Ok(Err(CensusFailure::Failed(reason))) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            pid,
            format!("the object census of pid {pid} failed: {reason}"),
            false,
        )),
        Err(_) => Err(stopped()),
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
