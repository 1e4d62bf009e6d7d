//! The protected API: `--web-config-file` (TLS and basic auth, checked by
//! curl and by a real Prometheus scraping over TLS), `--cmdline` with a
//! real Python process carrying a secret argument, and `--rate-limit`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    common::{Agent, OBSERVE_TIMEOUT, pyenv},
    deploy::{Prometheus, promtool},
};

const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse battery staple";

fn run(command: &mut Command) {
    let output = command.output().expect("running a command");
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA and a server certificate it signed for 127.0.0.1, made by the
/// openssl CLI; returns (ca.crt, server.crt, server.key).
pub(crate) fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let path = |name: &str| dir.join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509", "-days", "1", "-subj", "/CN=pymem test CA"])
        .args(ec)
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(path("ca.key"))
        .arg("-out")
        .arg(path("ca.crt")));
    sign(
        dir,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    (path("ca.crt"), path("server.crt"), path("server.key"))
}

/// `NAME.crt` and `NAME.key` in `dir`, signed by the CA there, with the
/// extensions `extensions`.
fn sign(dir: &Path, name: &str, extensions: &str) -> (PathBuf, PathBuf) {
    let path = |file: &str| dir.join(file);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-subj", &format!("/CN={name}")])
        .args(ec)
        .arg("-keyout")
        .arg(path(&format!("{name}.key")))
        .arg("-out")
        .arg(path(&format!("{name}.csr"))));
    fs::write(path(&format!("{name}.ext")), extensions).unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .arg("-in")
        .arg(path(&format!("{name}.csr")))
        .arg("-CA")
        .arg(path("ca.crt"))
        .arg("-CAkey")
        .arg(path("ca.key"))
        .arg("-extfile")
        .arg(path(&format!("{name}.ext")))
        .arg("-out")
        .arg(path(&format!("{name}.crt"))));
    (path(&format!("{name}.crt")), path(&format!("{name}.key")))
}

const CLIENT_EXTENSIONS: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

/// curl's answer to GET `url`: (HTTP status, response headers, body), or
/// curl's error when no HTTP answer came (curl exits non-zero).
pub(crate) fn curl(
    url: &str,
    ca: &Path,
    user: Option<(&str, &str)>,
) -> Result<(u16, String, String), String> {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10", "--include"])
        .arg("--cacert")
        .arg(ca);
    if let Some((name, password)) = user {
        command.arg("--user").arg(format!("{name}:{password}"));
    }
    let output = command.arg(url).output().expect("running curl");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
    let (headers, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, headers.to_lowercase(), body.to_string()))
}

#[test]
fn tls_and_basic_auth_protect_the_api_and_prometheus_scrapes_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let hash = bcrypt::hash(PASSWORD, bcrypt::DEFAULT_COST).unwrap();
    let web_config = dir.path().join("web-config.yml");
    // Paths relative to the file, as the Kubernetes Secret mounts them.
    fs::write(
        &web_config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  min_version: TLS12\nbasic_auth_users:\n  {USER}: '{hash}'\n",
            cert.file_name().unwrap().to_str().unwrap(),
            key.file_name().unwrap().to_str().unwrap(),
        ),
    )
    .unwrap();
    let check = Command::new(promtool())
        .args(["check", "web-config"])
        .arg(&web_config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check web-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let web_config_arg = web_config.display().to_string();
    let agent = Agent::start_until(&["--web-config-file", &web_config_arg], |agent| {
        let url = format!("https://127.0.0.1:{}/healthz", agent.port);
        matches!(curl(&url, &ca, None), Ok((200, _, _)))
    });
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", agent.port);
    let processes = url("/api/v1/processes");

    let (status, headers, _) = curl(&processes, &ca, None).unwrap();
    assert_eq!(status, 401, "without credentials");
    assert!(headers.contains("www-authenticate: basic"), "{headers}");
    let (status, headers, _) = curl(&processes, &ca, Some((USER, "wrong password"))).unwrap();
    assert_eq!(status, 401, "with a wrong password");
    assert!(headers.contains("www-authenticate: basic"), "{headers}");
    let (status, _, _) = curl(&processes, &ca, Some(("nobody", PASSWORD))).unwrap();
    assert_eq!(status, 401, "an unknown user with a known password");
    for round in 0..2 {
        // The second time from the cache of verified passwords.
        let (status, _, body) = curl(&processes, &ca, Some((USER, PASSWORD))).unwrap();
        assert_eq!(
            status, 200,
            "with the right password (round {round}): {body}"
        );
        let list: Value = serde_json::from_str(&body).unwrap();
        assert!(list.is_array(), "{body}");
    }
    let (status, _, body) = curl(&url("/metrics"), &ca, Some((USER, PASSWORD))).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("pymem_build_info"), "{body}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = format!("http://127.0.0.1:{}/healthz", agent.port);
    let answer = ureq::get(&plain)
        .config()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call();
    assert!(answer.is_err(), "plain HTTP was answered: {answer:?}");
    // Nor does a client that does not trust the CA.
    let untrusted = Command::new("curl")
        .args(["--silent", "--max-time", "10"])
        .arg(url("/healthz"))
        .status()
        .unwrap();
    assert!(!untrusted.success(), "curl without the CA connected");

    // Prometheus over TLS: one job with the password, one without it.
    let job = |name: &str, auth: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {}\n{auth}    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            ca.display(),
            agent.port
        )
    };
    let with_password =
        format!("    basic_auth:\n      username: {USER}\n      password: '{PASSWORD}'\n");
    let prometheus = Prometheus::start_scraping(
        &(job("pymem-agent", &with_password) + &job("pymem-anonymous", "")),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (up, anonymous) = loop {
        let value = |job: &str| {
            prometheus
                .query(&format!("up{{job=\"{job}\"}}"))
                .first()
                .and_then(|sample| sample["value"][1].as_str().map(String::from))
        };
        if let (Some(up), Some(anonymous)) = (value("pymem-agent"), value("pymem-anonymous")) {
            break (up, anonymous);
        }
        assert!(
            Instant::now() < deadline,
            "no scrape within 60 s:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(up, "1", "the scrape with basic auth over TLS failed");
    assert_eq!(anonymous, "0", "a scrape without credentials succeeded");
    let series = prometheus.query("pymem_build_info{job=\"pymem-agent\"}");
    assert_eq!(series.len(), 1, "{series:?}");
}

#[test]
fn a_bad_web_config_file_stops_the_agent_at_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("basic_auth_user:\n  a: b\n", "basic_auth_user"),
        ("basic_auth_users:\n  a: plaintext\n", "not a bcrypt hash"),
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            "missing.crt",
        ),
    ];
    for (text, reason) in cases {
        let file = dir.path().join("web-config.yml");
        fs::write(&file, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_pymem"))
            .args(["agent", "--listen", "127.0.0.1:0", "--web-config-file"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text:?} was accepted");
        assert!(stderr.contains(reason), "{text:?}: {stderr}");
        assert!(stderr.contains("web config file"), "{text:?}: {stderr}");
    }
}

#[test]
fn require_and_verify_client_cert_admits_only_clients_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificates(dir.path());
    let (client_cert, client_key) = sign(dir.path(), "client", CLIENT_EXTENSIONS);
    // A client certificate from a CA the agent does not know.
    let other = tempfile::tempdir().unwrap();
    certificates(other.path());
    let (stranger_cert, stranger_key) = sign(other.path(), "client", CLIENT_EXTENSIONS);
    let web_config = dir.path().join("web-config.yml");
    fs::write(
        &web_config,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  min_version: TLS13\n",
    )
    .unwrap();
    run(Command::new(promtool())
        .args(["check", "web-config"])
        .arg(&web_config));
    let get = |port: u16, client: Option<(&Path, &Path)>| {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--max-time", "10", "--output", "/dev/null"])
            .args(["--write-out", "%{http_code}"])
            .arg("--cacert")
            .arg(&ca);
        if let Some((cert, key)) = client {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let output = command
            .arg(format!("https://127.0.0.1:{port}/api/v1/processes"))
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let web_config_arg = web_config.display().to_string();
    let agent = Agent::start_until(&["--web-config-file", &web_config_arg], |agent| {
        get(agent.port, Some((&client_cert, &client_key))).as_deref() == Some("200")
    });
    assert_eq!(
        get(agent.port, None),
        None,
        "admitted without a certificate"
    );
    assert_eq!(
        get(agent.port, Some((&stranger_cert, &stranger_key))),
        None,
        "admitted with another CA's certificate"
    );
    // TLS 1.2 is below min_version.
    let tls12 = Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "10",
            "--tlsv1.2",
            "--tls-max",
            "1.2",
        ])
        .arg("--cacert")
        .arg(&ca)
        .arg("--cert")
        .arg(&client_cert)
        .arg("--key")
        .arg(&client_key)
        .arg(format!("https://127.0.0.1:{}/healthz", agent.port))
        .status()
        .unwrap();
    assert!(
        !tls12.success(),
        "TLS 1.2 was accepted under min_version TLS13"
    );
}

/// A Python process that sleeps with a secret on its command line.
struct SecretHolder {
    child: Child,
    script: PathBuf,
    python: PathBuf,
}

const SECRET: &str = "s3cr3t-token-4f9a";

impl SecretHolder {
    fn start(python: &Path, dir: &Path) -> Self {
        let script = dir.join("holds_a_secret.py");
        fs::write(&script, "import time\nwhile True:\n    time.sleep(1)\n").unwrap();
        let child = Command::new(python)
            .arg("-u")
            .arg(&script)
            .args(["--token", SECRET])
            .spawn()
            .unwrap();
        Self {
            child,
            script,
            python: python.to_path_buf(),
        }
    }
}

impl Drop for SecretHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cmdline_short_and_none_keep_a_secret_argument_out_of_the_api_and_full_shows_it() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let dir = tempfile::tempdir().unwrap();
    let holder = SecretHolder::start(&python, dir.path());
    let pid = holder.child.id();
    let expected = [
        (
            "short",
            format!("{} {}", holder.python.display(), holder.script.display()),
        ),
        ("none", String::new()),
        (
            "full",
            format!(
                "{} -u {} --token {SECRET}",
                holder.python.display(),
                holder.script.display()
            ),
        ),
    ];
    for (mode, cmdline) in expected {
        let agent = Agent::start(&["--cmdline", mode]);
        let process = agent.wait_for(pid, OBSERVE_TIMEOUT);
        assert_eq!(process.cmdline, cmdline, "--cmdline {mode}");
        for path in [
            "/api/v1/processes".to_string(),
            format!("/api/v1/processes/{pid}"),
        ] {
            let text = agent.get(&path).unwrap();
            assert_eq!(
                text.contains(SECRET),
                mode == "full",
                "--cmdline {mode}: the secret's presence in {path}"
            );
        }
        // No series carries a command line, whatever the mode.
        assert!(
            !agent.metrics().contains(SECRET),
            "--cmdline {mode}: /metrics"
        );
    }
}

#[test]
fn a_client_over_its_rate_limit_gets_429_with_retry_after_and_others_routes_still_answer() {
    let agent = Agent::start(&["--rate-limit", "1", "--rate-limit-burst", "3"]);
    // A pid nobody has: the route answers 404 quickly, and still counts.
    let types = agent.url("/api/v1/processes/4000000000/types");
    let call = |url: &str| {
        let mut response = ureq::get(url)
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = response.body_mut().read_to_string().unwrap_or_default();
        (response.status().as_u16(), retry_after, body)
    };
    let started = Instant::now();
    let statuses: Vec<u16> = (0..3).map(|_| call(&types).0).collect();
    assert_eq!(statuses, [404, 404, 404], "the burst");
    let (status, retry_after, body) = call(&types);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "too slow to test a 1/s limit"
    );
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert_eq!(retry_after, 1);
    // Other routes are not limited, and the process list still answers.
    for _ in 0..5 {
        assert_eq!(call(&agent.url("/api/v1/processes")).0, 200);
    }
    std::thread::sleep(Duration::from_secs(retry_after));
    assert_eq!(call(&types).0, 404, "after Retry-After");
    assert_eq!(call(&types).0, 429, "one token back, not more");
}

/// `pymem ARGS` with `env` set and the agent's own variables otherwise
/// unset: (success, stdout, stderr).
fn pymem_client(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pymem"));
    command.args(args).stdin(Stdio::null());
    for name in [
        "PYMEM_AGENT_USER",
        "PYMEM_AGENT_PASSWORD",
        "PYMEM_AGENT_CA_FILE",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().expect("running pymem");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn client_commands_reach_a_protected_agent_with_its_ca_and_credentials() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificates(dir.path());
    let hash = bcrypt::hash(PASSWORD, bcrypt::DEFAULT_COST).unwrap();
    let web_config = dir.path().join("web-config.yml");
    fs::write(
        &web_config,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  {USER}: '{hash}'\n"
        ),
    )
    .unwrap();
    let web_config_arg = web_config.display().to_string();
    let agent = Agent::start_until(&["--web-config-file", &web_config_arg], |agent| {
        let url = format!("https://127.0.0.1:{}/healthz", agent.port);
        matches!(curl(&url, &ca, None), Ok((200, _, _)))
    });
    let python_process = SecretHolder::start(&python, dir.path());
    let pid = python_process.child.id();
    let url = format!("https://127.0.0.1:{}", agent.port);
    let ca_arg = ca.display().to_string();
    let credentials = [
        ("PYMEM_AGENT_USER", USER),
        ("PYMEM_AGENT_PASSWORD", PASSWORD),
    ];
    let top = ["top", "--once", "--json", "--agent", &url];
    let lists_pid = |stdout: &str| {
        serde_json::from_str::<Vec<Value>>(stdout)
            .is_ok_and(|list| list.iter().any(|p| p["pid"] == u64::from(pid)))
    };

    // The CA from --agent-ca-file, the credentials from the environment.
    let with_ca: Vec<&str> = top
        .iter()
        .copied()
        .chain(["--agent-ca-file", &ca_arg])
        .collect();
    let deadline = Instant::now() + OBSERVE_TIMEOUT;
    loop {
        let (ok, stdout, stderr) = pymem_client(&with_ca, &credentials);
        assert!(ok, "pymem top over TLS with credentials: {stderr}");
        if lists_pid(&stdout) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} not listed within {OBSERVE_TIMEOUT:?}:\n{stdout}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The CA from the environment, the credentials from the URL (the
    // password percent-encoded).
    let encoded = PASSWORD.replace(' ', "%20");
    let url_with_userinfo = format!("https://{USER}:{encoded}@127.0.0.1:{}", agent.port);
    let (ok, stdout, stderr) = pymem_client(
        &["top", "--once", "--json", "--agent", &url_with_userinfo],
        &[("PYMEM_AGENT_CA_FILE", &ca_arg)],
    );
    assert!(ok, "credentials in the URL: {stderr}");
    assert!(lists_pid(&stdout), "{stdout}");

    // Without credentials: the agent's 401, for a view and for a command.
    let types_pid = pid.to_string();
    for args in [
        with_ca.clone(),
        vec![
            "types",
            &types_pid,
            "--agent",
            &url,
            "--agent-ca-file",
            &ca_arg,
        ],
    ] {
        let (ok, _, stderr) = pymem_client(&args, &[]);
        assert!(!ok, "{args:?} succeeded without credentials");
        assert!(
            stderr.contains(&format!(
                "the agent at {url} asks for credentials: set PYMEM_AGENT_USER/PYMEM_AGENT_PASSWORD"
            )),
            "{args:?}: {stderr}"
        );
    }
    // A wrong password, in the URL: refused, and not shown.
    let wrong = format!("https://{USER}:not-the-password@127.0.0.1:{}", agent.port);
    let (ok, _, stderr) = pymem_client(
        &[
            "top",
            "--once",
            "--agent",
            &wrong,
            "--agent-ca-file",
            &ca_arg,
        ],
        &[],
    );
    assert!(!ok, "a wrong password was accepted");
    assert!(
        stderr.contains(&format!(
            "the agent at {url} refused the credentials of user"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-password"), "{stderr}");

    // Without the CA file: the system's roots do not know the test CA.
    let (ok, _, stderr) = pymem_client(&top, &credentials);
    assert!(!ok, "connected without trusting the CA");
    assert!(stderr.contains("--agent-ca-file"), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
