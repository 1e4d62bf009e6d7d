//! Reading a process and its allocation sites from a running agent.
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, de::DeserializeOwned};

use crate::sites::Site;

/// The fields of `/api/v1/processes/{pid}` a snapshot keeps; the rest of
/// the process (and fields newer agents add) is ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub comm: String,
    pub python_version: String,
    pub heap_bytes: u64,
}

/// A `pymem agent`'s JSON API.
pub struct AgentApi {
    base_url: String,
    http: ureq::Agent,
}

impl AgentApi {
    /// The agent at `url`, or at the default address.
    pub fn new(url: Option<&str>) -> Self {
        let url = url.map_or_else(
            || format!("http://{}", crate::export::DEFAULT_LISTEN),
            base_url,
        );
        let http = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            // The first query of a process symbolises all its stacks.
            .timeout_global(Some(Duration::from_secs(30)))
            // Error statuses carry the agent's explanation in the body.
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base_url: url,
            http,
        }
    }

    pub fn process(&self, pid: u32) -> Result<ProcessSummary> {
        self.get_json(&format!("/api/v1/processes/{pid}"))
    }

    pub fn sites(&self, pid: u32) -> Result<Vec<Site>> {
        self.get_json(&format!("/api/v1/processes/{pid}/sites"))
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base_url);
        let mut response = self.http.get(&url).call().map_err(|e| {
            anyhow!(
                "no pymem agent answered at {}: {e}\n(start one with `sudo pymem agent`, or point --agent at one)",
                self.base_url
            )
        })?;
        let status = response.status().as_u16();
        if status == 200 {
            return response
                .body_mut()
                .read_json()
                .with_context(|| format!("reading GET {url}"));
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        match (status, body.trim()) {
            // axum's own 404 for an unknown route has no body.
            (404, "") => bail!(
                "the agent at {} does not serve {path} (an older pymem?)",
                self.base_url
            ),
            // "pid N is not observed"
            (404, reason) => bail!("{reason} by the agent at {}", self.base_url),
            (_, reason) => bail!("GET {url}: HTTP {status}: {reason}"),
        }
    }
}

/// `http://host:port` from `http://host:port/`, `host:port` or a bare port.
fn base_url(agent: &str) -> String {
    let agent = agent.trim().trim_end_matches('/');
    if let Ok(port) = agent.parse::<u16>() {
        format!("http://127.0.0.1:{port}")
    } else if agent.contains("://") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_become_base_urls() {
        assert_eq!(base_url("http://10.0.0.1:9477/"), "http://10.0.0.1:9477");
        assert_eq!(base_url("localhost:9000"), "http://localhost:9000");
        assert_eq!(base_url("9500"), "http://127.0.0.1:9500");
    }
}
