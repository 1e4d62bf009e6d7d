//! pymem's integration tests, as root, in one test binary: the real `pymem`
//! binary against real Python processes, one module per area.
#[macro_use]
mod common;

mod attribution;
mod baseline;
mod cache_service;
mod census;
mod core;
mod deploy;
mod gc;
mod guesses;
mod gunicorn;
mod holders;
mod hostile;
mod identity;
mod limits;
mod matrix;
mod oom;
mod restart;
mod robustness;
mod run;
mod sites;
mod sites_export;
mod top;
mod web_auth;
