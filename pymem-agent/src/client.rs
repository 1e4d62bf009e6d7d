//! A running `pymem agent`'s JSON API, as `pymem top` and the site commands
//! (`pymem sites`, `pymem snapshot`) read it.
use std::{fmt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use base64::Engine as _;
use serde::{Deserialize, de::DeserializeOwned};
use ureq::{
    http::{StatusCode, header::AUTHORIZATION},
    tls::{Certificate, RootCerts, TlsConfig},
};

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

/// The environment variables a client command takes the agent's basic
/// auth credentials from (kept out of the command line, which `ps` shows).
pub const USER_ENV: &str = "PYMEM_AGENT_USER";
pub const PASSWORD_ENV: &str = "PYMEM_AGENT_PASSWORD";

/// Basic auth credentials for a protected agent (`--web-config-file`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// The user and password of the `--agent` URL's userinfo, each else
    /// from the environment (`env_user`, `env_password`); none without a
    /// user.
    pub fn resolve(
        from_url: Option<UserInfo>,
        env_user: Option<String>,
        env_password: Option<String>,
    ) -> Option<Self> {
        let (url_user, url_password) =
            from_url.map_or((None, None), |u| (Some(u.user), u.password));
        let user = url_user.or(env_user).filter(|u| !u.is_empty())?;
        let password = url_password.or(env_password).unwrap_or_default();
        Some(Self { user, password })
    }

    /// From the URL's userinfo and PYMEM_AGENT_USER / PYMEM_AGENT_PASSWORD.
    fn from_env(from_url: Option<UserInfo>) -> Option<Self> {
        Self::resolve(
            from_url,
            std::env::var(USER_ENV).ok(),
            std::env::var(PASSWORD_ENV).ok(),
        )
    }

    fn authorization(&self) -> String {
        let pair = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// Never the password, wherever credentials are debug-printed.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The `user[:password]` of a URL, percent-decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub user: String,
    pub password: Option<String>,
}

/// `url` without its userinfo, and that userinfo: `https://u:p@host:1/x`
/// is `https://host:1/x` and `u`, `p`.
pub fn split_userinfo(url: &str) -> (String, Option<UserInfo>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    // The last '@': a password may hold an unencoded one.
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (decode(user), Some(decode(password))),
        None => (decode(userinfo), None),
    };
    (
        format!("{scheme}://{host}{path}"),
        Some(UserInfo { user, password }),
    )
}

/// Where the agent is and how to reach it, as the client commands' options
/// say.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentTarget<'a> {
    /// URL, HOST:PORT or port; None is the default address.
    pub url: Option<&'a str>,
    /// PEM certificates to trust instead of the system's roots (the
    /// DaemonSet's self-signed CA).
    pub ca_file: Option<&'a Path>,
}

impl<'a> AgentTarget<'a> {
    pub fn new(url: Option<&'a str>, ca_file: Option<&'a Path>) -> Self {
        Self { url, ca_file }
    }
}

/// The agent answered, but would not serve this client: it wants
/// credentials, or TLS with it failed. Commands do not fall back to an
/// observer of their own then, since an agent is there.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `e` says that an agent is there but refused this client (see
/// `Refused`), rather than that none answered.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<Refused>())
}

/// A `pymem agent`'s JSON API.
pub struct AgentClient {
    /// Without userinfo: it is shown in errors.
    base_url: String,
    credentials: Option<Credentials>,
    ca_file: Option<String>,
    http: ureq::Agent,
    caller: Caller,
}

impl AgentClient {
    /// The agent at `target`, or at the default address; credentials come
    /// from the URL's userinfo or the environment (PYMEM_AGENT_USER,
    /// PYMEM_AGENT_PASSWORD).
    pub fn new(target: AgentTarget<'_>, caller: Caller) -> Result<Self> {
        let (connect, total) = match caller {
            Caller::View => (1, 3),
            Caller::Command => (2, 30),
        };
        let url = target
            .url
            .map_or_else(default_agent_url, normalize_agent_url);
        let (base_url, userinfo) = split_userinfo(&url);
        let http = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(connect)))
            .timeout_global(Some(Duration::from_secs(total)))
            // Error statuses carry the agent's explanation in the body.
            .http_status_as_error(false)
            .tls_config(tls_config(target.ca_file)?)
            .build()
            .into();
        Ok(Self {
            base_url,
            credentials: Credentials::from_env(userinfo),
            ca_file: target.ca_file.map(|p| p.display().to_string()),
            http,
            caller,
        })
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

    /// Whether an agent answers and serves this client (a quick check of
    /// the process list, which a protected agent guards as it does the
    /// rest): why not if it does not.
    pub fn answers(&self) -> Result<()> {
        self.get_json::<serde_json::Value>("/api/v1/processes", "processes")
            .map(drop)
    }

    /// A GET of `url` with the credentials, if any.
    fn get(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let request = self.http.get(url);
        match &self.credentials {
            Some(credentials) => request.header(AUTHORIZATION, credentials.authorization()),
            None => request,
        }
    }

    /// GET `path` as JSON; `what` names the answer in errors.
    fn get_json<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<T> {
        let url = format!("{}{path}", self.base_url);
        let response = self.get(&url).call();
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

    /// Nothing answered at `url`, or TLS with it failed.
    fn unreachable(&self, url: &str, e: ureq::Error) -> anyhow::Error {
        if let Some(tls) = rustls_error(&e) {
            return self.tls_failed(tls).into();
        }
        match self.caller {
            Caller::View => anyhow!(e).context(format!("GET {url}")),
            Caller::Command => anyhow!(
                "no pymem agent answered at {}: {e}\n(start one with `sudo pymem agent`, or point --agent at one)",
                self.base_url
            ),
        }
    }

    /// TLS with the agent failed with `e`: what to do about it.
    fn tls_failed(&self, e: &rustls::Error) -> Refused {
        use rustls::{CertificateError, Error};
        let agent = &self.base_url;
        Refused(match (e, &self.ca_file) {
            (
                Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ),
                None,
            ) => format!(
                "the agent at {agent} presented a certificate from a CA this host does not trust ({e}): pass that CA's PEM file with --agent-ca-file (or {CA_FILE_ENV})"
            ),
            (
                Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ),
                _,
            ) => format!(
                "the agent at {agent} presented a certificate for other names ({e}): connect by a name or address the certificate holds"
            ),
            (_, Some(ca_file)) => {
                format!("TLS with the agent at {agent} failed ({e}), trusting the CA in {ca_file}")
            }
            (_, None) => format!("TLS with the agent at {agent} failed: {e}"),
        })
    }

    /// The agent asked for credentials (401).
    fn unauthorized(&self) -> Refused {
        let agent = &self.base_url;
        Refused(match &self.credentials {
            None => {
                format!("the agent at {agent} asks for credentials: set {USER_ENV}/{PASSWORD_ENV}")
            }
            Some(credentials) => format!(
                "the agent at {agent} refused the credentials of user {:?}: check {USER_ENV}/{PASSWORD_ENV}",
                credentials.user
            ),
        })
    }

    /// The agent answered `status`, explained by `reason` (its body).
    fn refused(&self, path: &str, url: &str, status: StatusCode, reason: &str) -> anyhow::Error {
        if status == StatusCode::UNAUTHORIZED {
            return self.unauthorized().into();
        }
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

/// The environment variable for --agent-ca-file.
pub const CA_FILE_ENV: &str = "PYMEM_AGENT_CA_FILE";

/// rustls with ring (the agent's own provider: no second one in the
/// binary), trusting the CA in `ca_file` if given, else the system's roots.
fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig> {
    let roots = match ca_file {
        None => RootCerts::PlatformVerifier,
        Some(path) => {
            let certificates: Vec<Certificate<'static>> =
                crate::export::pem_certificates(path, "the agent's CA file")?
                    .iter()
                    .map(|der| Certificate::from_der(der.as_ref()).to_owned())
                    .collect();
            RootCerts::new_with_certs(&certificates)
        }
    };
    Ok(TlsConfig::builder()
        .root_certs(roots)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

/// The rustls error under `e`, where TLS failed.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(tls) => Some(tls),
        // The handshake's errors come through the socket's io::Error.
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
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
            AgentClient::new(AgentTarget::default(), Caller::Command)
                .unwrap()
                .base_url(),
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
        let err = AgentClient::new(AgentTarget::new(Some(&free_port()), None), Caller::View)
            .unwrap()
            .processes()
            .unwrap_err();
        assert!(format!("{err:#}").contains("/api/v1/processes"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn commands_name_the_absent_agent() {
        let port = free_port();
        let err = AgentClient::new(AgentTarget::new(Some(&port), None), Caller::Command)
            .unwrap()
            .sites(1, Duration::ZERO)
            .unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!(
                "no pymem agent answered at http://127.0.0.1:{port}: "
            )),
            "{err:#}"
        );
    }

    #[test]
    fn userinfo_is_split_from_the_url_and_percent_decoded() {
        assert_eq!(
            split_userinfo("https://alice:p%40ss:w0rd@node.example:9477/api"),
            (
                "https://node.example:9477/api".to_string(),
                Some(UserInfo {
                    user: "alice".into(),
                    password: Some("p@ss:w0rd".into())
                })
            )
        );
        // A raw '@' in the password: the host is after the last one.
        assert_eq!(
            split_userinfo("https://bob:a@b@127.0.0.1:9477"),
            (
                "https://127.0.0.1:9477".to_string(),
                Some(UserInfo {
                    user: "bob".into(),
                    password: Some("a@b".into())
                })
            )
        );
        assert_eq!(
            split_userinfo("https://carol@127.0.0.1:9477"),
            (
                "https://127.0.0.1:9477".to_string(),
                Some(UserInfo {
                    user: "carol".into(),
                    password: None
                })
            )
        );
        // An '@' after the authority is not userinfo.
        assert_eq!(
            split_userinfo("http://127.0.0.1:9477/a@b"),
            ("http://127.0.0.1:9477/a@b".to_string(), None)
        );
        assert_eq!(
            split_userinfo("127.0.0.1:9477"),
            ("127.0.0.1:9477".to_string(), None)
        );
    }

    #[test]
    fn credentials_come_from_the_url_else_the_environment() {
        let info = |user: &str, password: Option<&str>| {
            Some(UserInfo {
                user: user.into(),
                password: password.map(String::from),
            })
        };
        let env = |v: &str| Some(v.to_string());
        let credentials = |user: &str, password: &str| {
            Some(Credentials {
                user: user.into(),
                password: password.into(),
            })
        };
        assert_eq!(Credentials::resolve(None, None, None), None);
        assert_eq!(
            Credentials::resolve(None, env("sre"), env("secret")),
            credentials("sre", "secret")
        );
        assert_eq!(
            Credentials::resolve(info("alice", Some("url")), env("sre"), env("secret")),
            credentials("alice", "url")
        );
        // A user in the URL, its password from the environment.
        assert_eq!(
            Credentials::resolve(info("alice", None), None, env("secret")),
            credentials("alice", "secret")
        );
        // A password alone is no credentials.
        assert_eq!(Credentials::resolve(None, None, env("secret")), None);
    }

    #[test]
    fn the_client_shows_the_agent_url_without_its_password() {
        let client = AgentClient::new(
            AgentTarget::new(Some("https://alice:hunter2@127.0.0.1:9477/"), None),
            Caller::Command,
        )
        .unwrap();
        assert_eq!(client.base_url(), "https://127.0.0.1:9477");
        let credentials = client.credentials.as_ref().unwrap();
        assert_eq!(credentials.user, "alice");
        assert_eq!(credentials.authorization(), "Basic YWxpY2U6aHVudGVyMg==");
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert!(!format!("{:#}", client.unauthorized()).contains("hunter2"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, "not a certificate\n").unwrap();
        let err = AgentClient::new(AgentTarget::new(None, Some(&file)), Caller::Command)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
    }
}
