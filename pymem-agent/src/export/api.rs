//! The JSON API's process routes: every observed process, or one.
use axum::{
    Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};

use super::{AppState, not_observed};
use crate::model::ProcessInfo;

pub(super) async fn processes(State(state): State<AppState>) -> Json<Vec<ProcessInfo>> {
    Json(state.snapshot.read().expect("snapshot").processes.clone())
}

pub(super) async fn process(State(state): State<AppState>, Path(pid): Path<u32>) -> Response {
    match state.process(pid) {
        Some(p) => Json(p).into_response(),
        None => not_observed(pid),
    }
}
