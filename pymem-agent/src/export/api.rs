//! The JSON API's process routes: every observed process, or one; and the
//! post-mortems of processes killed for memory.
use axum::{
    Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};

use super::{AppState, not_observed};
use crate::model::{OomKill, ProcessInfo};

pub(super) async fn processes(State(state): State<AppState>) -> Json<Vec<ProcessInfo>> {
    Json(state.snapshot.read().expect("snapshot").processes.clone())
}

pub(super) async fn process(State(state): State<AppState>, Path(pid): Path<u32>) -> Response {
    match state.process(pid) {
        Some(p) => Json(p).into_response(),
        None => not_observed(pid),
    }
}

/// The post-mortems of the latest OOM-killed Python processes, newest first.
pub(super) async fn oom_kills(State(state): State<AppState>) -> Json<Vec<OomKill>> {
    Json(state.snapshot.read().expect("snapshot").oom_kills.clone())
}
