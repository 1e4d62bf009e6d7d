//! A running `pymem agent`'s JSON API, as `pymem top` and the site commands
//! (`pymem sites`, `pymem snapshot`) read it.
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, de::DeserializeOwned};
use ureq::http::StatusCode;

use crate::{
    census::{CensusErrorBody, CensusReport},
    holders::HoldersReport,
    model::{OomKill, ProcessInfo},
    sites::{Site, keys::GroupBy, state::SitesReport},
};

/// The fields of `/api/v1/processes/{pid}` a site snapshot keeps; the rest
/// of the process (and fields newer agents add) is ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub comm: String,
    pub python_version: String,
    pub heap_bytes: u64,
}

/// How long a census may take to answer: pausing, copying and parsing a
/// heap of gigabytes.
const CENSUS_TIMEOUT: Duration = Duration::from_secs(120);

/// Who asks, which decides how long to wait and how failures read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A view that refreshes (`pymem top`): short timeouts, so that a hung
    /// agent shows as an error in the header instead of freezing the
    /// refresh, and errors short enough for that header.
    View,
    /// A one-shot command: a long timeout, as the first query of a process
    /// symbolises all its stacks, and errors that name the agent and say
    /// what to do.
    Command,
}

/// A `pymem agent`'s JSON API.
pub struct AgentClient {
    base_url: String,
    http: ureq::Agent,
    caller: Caller,
}

impl AgentClient {
    /// The agent at `agent` (URL, HOST:PORT or port), or at the default
    /// address.
    pub fn new(agent: Option<&str>, caller: Caller) -> Self {
        let (connect, total) = match caller {
            Caller::View => (1, 3),
            Caller::Command => (2, 30),
        };
        let http = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(connect)))
            .timeout_global(Some(Duration::from_secs(total)))
            // Error statuses carry the agent's explanation in the body.
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base_url: agent.map_or_else(default_agent_url, normalize_agent_url),
            http,
            caller,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Every process the agent observes.
    pub fn processes(&self) -> Result<Vec<ProcessInfo>> {
        self.get_json("/api/v1/processes", "processes")
    }

    /// Post-mortems of the Python processes the kernel killed for memory,
    /// newest first.
    pub fn oom_kills(&self) -> Result<Vec<OomKill>> {
        self.get_json("/api/v1/oom-kills", "the OOM kills")
    }

    pub fn process(&self, pid: u32) -> Result<ProcessSummary> {
        self.get_json(&format!("/api/v1/processes/{pid}"), "the process")
    }

    /// The sites of `pid`, heaviest live bytes first, by heap state from a
    /// census no older than `max_age` where one can be had.
    pub fn sites(&self, pid: u32, max_age: Duration) -> Result<Vec<Site>> {
        Ok(self.sites_report(pid, max_age, None, GroupBy::App)?.sites)
    }

    /// The sites of `pid` and how they were attributed; `attribution`
    /// forces `heap_state` or `allocation_samples`.
    pub fn sites_report(
        &self,
        pid: u32,
        max_age: Duration,
        attribution: Option<&str>,
        group_by: GroupBy,
    ) -> Result<SitesReport> {
        let forced = attribution.map_or(String::new(), |a| format!("&attribution={a}"));
        let key = serde_json::to_value(group_by)?;
        let path = format!(
            "/api/v1/processes/{pid}/sites?report=1&max_age={}&group_by={}{forced}",
            max_age.as_secs_f64(),
            key.as_str().unwrap_or("app")
        );
        self.get_json_within(&path, "sites", CENSUS_TIMEOUT)
    }

    /// An object census of `pid` no older than `max_age` (zero: a fresh
    /// one, which pauses the process), with the growth since the one before
    /// if `growth`; at most `limit` types (0 = all).
    pub fn census(
        &self,
        pid: u32,
        max_age: Duration,
        growth: bool,
        limit: usize,
    ) -> Result<CensusReport> {
        let path = format!(
            "/api/v1/processes/{pid}/census?max_age={}&growth={}&limit={limit}",
            max_age.as_secs_f64(),
            u8::from(growth)
        );
        self.get_json_within(&path, "the object census", CENSUS_TIMEOUT)
    }

    /// What holds the memory of `pid`, from a census no older than
    /// `max_age`: the first `limit` roots (0 = all) with `depth` levels of
    /// children (None = all), with the census's totals.
    pub fn holders(
        &self,
        pid: u32,
        max_age: Duration,
        limit: usize,
        depth: Option<usize>,
    ) -> Result<HoldersReport> {
        let depth = depth.map_or_else(String::new, |d| format!("&depth={d}"));
        let path = format!(
            "/api/v1/processes/{pid}/holders?report=1&max_age={}&limit={limit}{depth}",
            max_age.as_secs_f64(),
        );
        self.get_json_within(&path, "the holders", CENSUS_TIMEOUT)
    }

    /// Whether an agent answers at all (a quick liveness check).
    pub fn answers(&self) -> bool {
        let url = format!("{}/healthz", self.base_url);
        self.http
            .get(&url)
            .call()
            .is_ok_and(|r| r.status().is_success())
    }

    /// GET `path` as JSON; `what` names the answer in errors.
    fn get_json<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<T> {
        let url = format!("{}{path}", self.base_url);
        let response = self.http.get(&url).call();
        self.read_json(response, path, &url, what)
    }

    /// As `get_json`, for answers that take long whoever asks (a census
    /// copies a whole heap).
    fn get_json_within<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base_url);
        let response = self
            .http
            .get(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call();
        self.read_json(response, path, &url, what)
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        path: &str,
        url: &str,
        what: &str,
    ) -> Result<T> {
        let url = url.to_string();
        let mut response = response.map_err(|e| self.unreachable(&url, e))?;
        let status = response.status();
        if status.is_success() {
            return response
                .body_mut()
                .read_json()
                .with_context(|| match self.caller {
                    Caller::View => format!("reading {what} from {url}"),
                    Caller::Command => format!("reading GET {url}"),
                });
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        // The census routes explain themselves as `{"error": ...}`.
        let reason = serde_json::from_str::<CensusErrorBody>(&body)
            .map_or_else(|_| body.trim().to_string(), |e| e.error);
        Err(self.refused(path, &url, status, &reason))
    }

    /// Nothing answered at `url`.
    fn unreachable(&self, url: &str, e: ureq::Error) -> anyhow::Error {
        match self.caller {
            Caller::View => anyhow!(e).context(format!("GET {url}")),
            Caller::Command => anyhow!(
                "no pymem agent answered at {}: {e}\n(start one with `sudo pymem agent`, or point --agent at one)",
                self.base_url
            ),
        }
    }

    /// The agent answered `status`, explained by `reason` (its body).
    fn refused(&self, path: &str, url: &str, status: StatusCode, reason: &str) -> anyhow::Error {
        match (self.caller, status.as_u16(), reason) {
            (Caller::View, ..) => anyhow!("GET {url}: {status}: {reason}"),
            // axum's own 404 for an unknown route has no body.
            (Caller::Command, 404, "") => anyhow!(
                "the agent at {} does not serve {path} (an older pymem?)",
                self.base_url
            ),
            // "pid N is not observed"
            // "no object census of pid N: <why>": nothing to add.
            (Caller::Command, 501, reason) => anyhow!("{reason}"),
            (Caller::Command, 404, reason) => {
                anyhow!("{reason} by the agent at {}", self.base_url)
            }
            (Caller::Command, status, reason) => anyhow!("GET {url}: HTTP {status}: {reason}"),
        }
    }
}

/// The default agent address as a URL.
pub fn default_agent_url() -> String {
    format!("http://{}", crate::export::DEFAULT_LISTEN)
}

/// `http://host:port` from `http://host:port/`, `host:port` or a bare port.
pub fn normalize_agent_url(agent: &str) -> String {
    let agent = agent.trim().trim_end_matches('/');
    if let Ok(port) = agent.parse::<u16>() {
        return format!("http://127.0.0.1:{port}");
    }
    if agent.contains("://") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn agent_urls_are_normalized() {
        assert_eq!(
            normalize_agent_url("http://10.0.0.1:9477/"),
            "http://10.0.0.1:9477"
        );
        assert_eq!(
            normalize_agent_url("localhost:9000"),
            "http://localhost:9000"
        );
        assert_eq!(normalize_agent_url("9500"), "http://127.0.0.1:9500");
        assert_eq!(default_agent_url(), "http://127.0.0.1:9477");
        assert_eq!(
            AgentClient::new(None, Caller::Command).base_url(),
            "http://127.0.0.1:9477"
        );
    }

    /// A port nothing listens on: bound, then released.
    fn free_port() -> String {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string()
    }

    #[test]
    fn an_absent_agent_is_an_error_not_a_hang() {
        let started = Instant::now();
        let err = AgentClient::new(Some(&free_port()), Caller::View)
            .processes()
            .unwrap_err();
        assert!(format!("{err:#}").contains("/api/v1/processes"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn commands_name_the_absent_agent() {
        let port = free_port();
        let err = AgentClient::new(Some(&port), Caller::Command)
            .sites(1, Duration::ZERO)
            .unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!(
                "no pymem agent answered at http://127.0.0.1:{port}: "
            )),
            "{err:#}"
        );
    }
}
