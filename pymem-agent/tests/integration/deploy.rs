//! deploy/: the Kubernetes manifests (validated), the Prometheus rules
//! (promtool), the Dockerfile's pins, pod attribution of a real Python
//! process in a kubelet-style cgroup, and a real Prometheus scraping a real
//! agent that observes a real leak, with every PromQL expression of the
//! dashboard and of the alert rules evaluated against it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::common::{Agent, Workload, free_port, pip_install_unless_importable, pyenv, stdout_of};
use pymem_agent::model::{Accounting, ProcessInfo};
use serde_json::{Value, json};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Kubernetes version the manifests are validated against (the newest
/// kubernetes-validate knows).
const KUBERNETES_VERSION: &str = "1.37.0";
const OVERLAYS: [&str; 3] = ["base", "prometheus-operator", "privileged"];

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("bad YAML: {e}\n{text}"))
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("bad YAML: {e}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------
// Manifests

/// The overlay's objects as `kubectl kustomize` renders them. Without
/// kubectl only the base can be rendered: its kustomization lists plain
/// resources, concatenated here with the namespace it sets.
fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = repo(&format!("deploy/kubernetes/{overlay}"));
    if on_path("kubectl") {
        let text = stdout_of(Command::new("kubectl").arg("kustomize").arg(&dir));
        return Some(yaml_documents(&text));
    }
    if overlay != "base" {
        eprintln!("SKIP rendering {overlay}: no kubectl (kustomize) here to apply its patches");
        return None;
    }
    let kustomization = yaml(&fs::read_to_string(dir.join("kustomization.yaml")).unwrap());
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        let text = fs::read_to_string(dir.join(resource.as_str().unwrap())).unwrap();
        objects.extend(yaml_documents(&text));
    }
    Some(objects)
}

fn is_operator_crd(object: &Value) -> bool {
    object["apiVersion"] == "monitoring.coreos.com/v1"
}

/// The pyenv 3.11 interpreter with kubernetes-validate, installed if
/// missing (`cargo xtask setup` installs it too).
fn kubernetes_validate() -> Option<PathBuf> {
    let python = pyenv("3.11")?;
    pip_install_unless_importable(&python, "kubernetes_validate", &["kubernetes-validate"])
        .then_some(python)
}

/// Runs kubernetes-validate in strict mode (unknown fields are errors) on
/// `objects`; Ok or the validator's report.
fn validate_strictly(python: &Path, objects: &[&Value]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("manifests.json");
    let mut paths = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = file.with_file_name(format!("{i}.json"));
        fs::write(&path, serde_json::to_string(object).unwrap()).unwrap();
        paths.push(path);
    }
    let output = Command::new(python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(&paths)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

#[test]
fn manifests_are_valid_for_a_current_kubernetes_in_strict_mode() {
    let python = require!(
        kubernetes_validate(),
        "pyenv 3.11 (for kubernetes-validate)"
    );
    for overlay in OVERLAYS {
        let Some(objects) = render(overlay) else {
            continue;
        };
        let (crds, core): (Vec<&Value>, Vec<&Value>) =
            objects.iter().partition(|o| is_operator_crd(o));
        for crd in &crds {
            eprintln!(
                "{overlay}: {} is a Prometheus Operator CRD kubernetes-validate has no schema for; checked by operator_resources_match_the_service_and_the_rule_file",
                crd["kind"]
            );
        }
        match validate_strictly(&python, &core) {
            Ok(report) => eprintln!("{overlay}: {} objects valid\n{report}", core.len()),
            Err(report) => {
                panic!("{overlay} is not valid Kubernetes {KUBERNETES_VERSION}:\n{report}")
            }
        }
    }
    // The validator does reject what it should: an unknown field.
    let mut daemonset = render("base")
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    daemonset["spec"]["template"]["spec"]["hostPid"] = json!(true);
    assert!(
        validate_strictly(&python, &[&daemonset]).is_err(),
        "strict validation must reject a misspelt field"
    );
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn daemonset_runs_the_agent_on_every_node_as_documented() {
    let objects = render("base").unwrap();
    let daemonset = object(&objects, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["serviceAccountName"], "pymem-agent");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "tolerates every taint: {}",
        pod["tolerations"]
    );
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--listen=0.0.0.0:9477"), "{args:?}");
    assert!(
        args.iter()
            .any(|a| a.starts_with("--labels=") && a.contains("namespace,pod,container")),
        "{args:?}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], "metrics", "{probe}");
        assert_eq!(agent[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    // Protected: TLS and basic auth from the mounted web config, and no
    // command-line arguments in what the agent shows.
    assert!(args.contains(&"--cmdline=short"), "{args:?}");
    let web_config = args
        .iter()
        .find_map(|a| a.strip_prefix("--web-config-file="))
        .expect("--web-config-file");
    let (directory, file) = web_config.rsplit_once('/').unwrap();
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == directory)
        .unwrap_or_else(|| panic!("nothing mounted at {directory}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let sources = volume["projected"]["sources"].as_array().unwrap();
    let secret = shipped_web_config_secret(&objects);
    assert!(
        sources
            .iter()
            .any(|s| s["secret"]["name"] == secret["metadata"]["name"]),
        "{sources:?}"
    );
    assert!(secret["data"].get(file).is_some(), "{secret}");
    let tls = sources
        .iter()
        .find(|s| s["secret"]["name"] == "pymem-agent-tls")
        .expect("the TLS Secret");
    let web_config = shipped_web_config(&objects);
    for key in ["cert_file", "key_file"] {
        let name = web_config["tls_server_config"][key].as_str().unwrap();
        assert!(
            tls["secret"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|item| item["path"] == name),
            "{key} {name} is not in the mounted TLS Secret"
        );
    }
    assert_eq!(agent["ports"][0]["containerPort"], 9477);
    assert_eq!(agent["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                agent["resources"][kind][resource].is_string(),
                "{kind}.{resource}"
            );
        }
    }
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/sys/kernel/tracing")
    );
    let rbac = object(&objects, "ClusterRole");
    assert_eq!(
        rbac["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
        "least privilege: read pods, nothing else"
    );
    // Every added capability says why, in the comment right above it.
    let text = read("deploy/kubernetes/base/daemonset.yaml");
    let lines: Vec<&str> = text.lines().collect();
    for capability in daemonset_capabilities() {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("- {capability}"))
            .unwrap();
        assert!(
            lines[at - 1].trim_start().starts_with('#'),
            "{capability} has no comment saying why"
        );
    }
}

/// The Secret kustomize generates from deploy/kubernetes/base/web-config.yml.
fn shipped_web_config_secret(objects: &[Value]) -> &Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == "Secret"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("pymem-web-config"))
        })
        .expect("the web config Secret")
}

/// The web config file as the rendered Secret holds it.
fn shipped_web_config_text(objects: &[Value]) -> String {
    use base64::Engine as _;
    let encoded: String = shipped_web_config_secret(objects)["data"]["web-config.yml"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn shipped_web_config(objects: &[Value]) -> Value {
    yaml(&shipped_web_config_text(objects))
}

#[test]
fn the_shipped_web_config_passes_promtool_and_the_agent_enforces_it() {
    let objects = render("base").unwrap();
    let text = shipped_web_config_text(&objects);
    assert_eq!(text, read("deploy/kubernetes/base/web-config.yml"));
    // The certificate and key beside it, as the projected volume mounts them.
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::web_auth::certificates(dir.path());
    fs::rename(&cert, dir.path().join("tls.crt")).unwrap();
    fs::rename(&key, dir.path().join("tls.key")).unwrap();
    let file = dir.path().join("web-config.yml");
    fs::write(&file, &text).unwrap();
    stdout_of(
        Command::new(promtool())
            .args(["check", "web-config"])
            .arg(&file),
    );
    let file_arg = file.display().to_string();
    let healthz = |agent: &Agent| {
        let url = format!("https://127.0.0.1:{}/healthz", agent.port);
        crate::web_auth::curl(&url, &ca, None).map(|(status, _, _)| status)
    };
    // As the DaemonSet's probes see it: /healthz over TLS, no credentials.
    let agent = Agent::start_until(&["--web-config-file", &file_arg], |agent| {
        healthz(agent) == Ok(200)
    });
    // Nobody knows the shipped hash's password: not even the user name.
    let processes = format!("https://127.0.0.1:{}/api/v1/processes", agent.port);
    for password in ["", "prometheus", "password", "changeme"] {
        let (status, _, _) =
            crate::web_auth::curl(&processes, &ca, Some(("prometheus", password))).unwrap();
        assert_eq!(status, 401, "password {password:?}");
    }
}

#[test]
fn the_scrape_job_scrapes_over_tls_with_basic_auth_and_passes_promtool() {
    let text = read("deploy/prometheus/pymem-scrape.yml");
    let config = yaml(&text);
    let job = &config["scrape_configs"][0];
    assert_eq!(job["job_name"], "pymem-agent", "as the alert rules expect");
    assert_eq!(job["scheme"], "https");
    assert_eq!(job["basic_auth"]["username"], "prometheus");
    let objects = render("base").unwrap();
    let users = &shipped_web_config(&objects)["basic_auth_users"];
    assert!(users.get("prometheus").is_some(), "{users}");
    // promtool checks that the files named exist: give it some.
    let dir = tempfile::tempdir().unwrap();
    let mut local = text.clone();
    for key in ["ca_file", "password_file"] {
        let path = job
            .get("tls_config")
            .and_then(|t| t.get(key))
            .or_else(|| job["basic_auth"].get(key))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{key}"));
        let replacement = dir.path().join(key);
        fs::write(&replacement, "x").unwrap();
        local = local.replace(path, &replacement.display().to_string());
    }
    let file = dir.path().join("prometheus.yml");
    fs::write(&file, local).unwrap();
    stdout_of(
        Command::new(promtool())
            .args(["check", "config"])
            .arg(&file),
    );
    // The name the ServiceMonitor and the job verify is the Service's.
    let service = object(&objects, "Service");
    let name = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(job["tls_config"]["server_name"], name.as_str());
}

fn daemonset_capabilities() -> Vec<String> {
    let objects = render("base").unwrap();
    object(&objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn operator_resources_match_the_service_and_the_rule_file() {
    let Some(objects) = render("prometheus-operator") else {
        return;
    };
    let service = object(&objects, "Service");
    let monitor = object(&objects, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    // The ServiceMonitor selects the Service, in its namespace, by a port
    // name the Service has.
    let labels = service["metadata"]["labels"].as_object().unwrap();
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(key), Some(value), "selector {key}");
    }
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!([service["metadata"]["namespace"]])
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(
        endpoint["tlsConfig"]["ca"]["secret"]["name"],
        "pymem-agent-tls"
    );
    assert_eq!(
        endpoint["tlsConfig"]["serverName"],
        format!(
            "{}.{}.svc",
            service["metadata"]["name"].as_str().unwrap(),
            service["metadata"]["namespace"].as_str().unwrap()
        )
    );
    for part in ["username", "password"] {
        assert!(
            endpoint["basicAuth"][part]["name"].is_string(),
            "basicAuth.{part}"
        );
    }
    let port = &endpoint["port"];
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "endpoint port {port}"
    );
    assert_eq!(
        labels[monitor["spec"]["jobLabel"].as_str().unwrap()],
        "pymem-agent",
        "job=\"pymem-agent\", as the alert rules expect"
    );
    // Not scraped twice: the operator overlay drops the scrape annotations.
    let daemonset = object(&objects, "DaemonSet");
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    assert!(
        annotations.get("prometheus.io/scrape").is_none(),
        "{annotations}"
    );

    let rule = object(&objects, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let plain = yaml(&read("deploy/prometheus/pymem-alerts.yml"));
    assert_eq!(
        rule["spec"]["groups"], plain["groups"],
        "PrometheusRule and pymem-alerts.yml differ"
    );
}

// ---------------------------------------------------------------------------
// Prometheus rules and the image

/// promtool, from Debian's prometheus package (installed when missing).
pub(crate) fn promtool() -> PathBuf {
    ensure_prometheus_package();
    PathBuf::from("/usr/bin/promtool")
}

fn ensure_prometheus_package() {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap();
    if Path::new("/usr/bin/prometheus").exists() && Path::new("/usr/bin/promtool").exists() {
        return;
    }
    let apt = |args: &[&str]| {
        stdout_of(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"]);
    apt(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "prometheus",
    ]);
}

#[test]
fn alert_rules_pass_promtool_and_the_leak_and_limit_alerts_fire_in_their_unit_tests() {
    let promtool = promtool();
    let dir = repo("deploy/prometheus");
    stdout_of(
        Command::new(&promtool)
            .args(["check", "rules", "pymem-alerts.yml"])
            .current_dir(&dir),
    );
    let report = stdout_of(
        Command::new(&promtool)
            .args(["test", "rules", "pymem-alerts.test.yml"])
            .current_dir(&dir),
    );
    eprintln!("{report}");
    let tests = yaml(&read("deploy/prometheus/pymem-alerts.test.yml"));
    let leak_fires = tests["tests"].as_array().unwrap().iter().any(|test| {
        test["alert_rule_test"]
            .as_array()
            .unwrap()
            .iter()
            .any(|case| {
                case["alertname"] == "PythonMemoryLeakSuspected"
                    && !case["exp_alerts"].as_array().unwrap().is_empty()
            })
    });
    assert!(leak_fires, "a unit test expects the leak alert to fire");

    // The limit alert fires in one unit test, and in another stays quiet
    // while a time to the limit is over an hour all along.
    let mut limit_fires = false;
    let mut quiet_over_an_hour = false;
    for test in tests["tests"].as_array().unwrap() {
        let interval = minutes(test["interval"].as_str().unwrap());
        let etas: Vec<Vec<Option<f64>>> = test["input_series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["series"]
                    .as_str()
                    .unwrap()
                    .starts_with("pymem_memory_limit_eta_seconds{")
            })
            .map(|s| expand_series(s["values"].as_str().unwrap()))
            .collect();
        for case in test["alert_rule_test"].as_array().unwrap() {
            if case["alertname"] != "PythonMemoryLimitSoon" {
                continue;
            }
            if !case["exp_alerts"].as_array().unwrap().is_empty() {
                limit_fires = true;
                continue;
            }
            let until = (minutes(case["eval_time"].as_str().unwrap()) / interval) as usize;
            quiet_over_an_hour |= etas.iter().any(|values| {
                values.len() > until
                    && values[..=until]
                        .iter()
                        .all(|v| v.is_some_and(|eta| eta > 3600.0))
            });
        }
    }
    assert!(
        limit_fires,
        "a unit test expects PythonMemoryLimitSoon to fire"
    );
    assert!(
        quiet_over_an_hour,
        "a unit test expects PythonMemoryLimitSoon not to fire for a time to the limit over an hour"
    );
}

/// `12m` (or `1h`, `30s`) in minutes, as promtool's durations are written
/// in these tests.
fn minutes(duration: &str) -> f64 {
    let (number, unit) = duration.split_at(duration.len() - 1);
    let number: f64 = number.parse().unwrap();
    match unit {
        "s" => number / 60.0,
        "m" => number,
        "h" => number * 60.0,
        _ => panic!("duration {duration}"),
    }
}

/// promtool's expanding notation: `a`, `_` (no sample), `axN`, `_xN` and
/// `a+bxN` / `a-bxN` (N + 1 samples).
fn expand_series(values: &str) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for token in values.split_whitespace() {
        let Some((start, times)) = token.split_once('x') else {
            out.push(token.parse().ok());
            continue;
        };
        let times: usize = times.parse().unwrap();
        if start == "_" {
            out.extend(std::iter::repeat_n(None, times));
            continue;
        }
        let split = start[1..].find(['+', '-']).map(|at| at + 1);
        let (first, step) = match split {
            Some(at) => (
                start[..at].parse::<f64>().unwrap(),
                start[at..].parse::<f64>().unwrap(),
            ),
            None => (start.parse::<f64>().unwrap(), 0.0),
        };
        out.extend((0..=times).map(|i| Some(first + step * i as f64)));
    }
    out
}

#[test]
fn promtool_series_notation_expands_like_promtool() {
    assert_eq!(
        expand_series("1 _ 3+2x2 7200-60x1 5x1 _x2"),
        [
            1.0,
            f64::NAN,
            3.0,
            5.0,
            7.0,
            7200.0,
            7140.0,
            5.0,
            5.0,
            f64::NAN,
            f64::NAN
        ]
        .map(|v| (!v.is_nan()).then_some(v))
    );
}

/// `NAME: &str = "value"` (Rust) or `ARG NAME=value` (Dockerfile).
fn pinned(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub const ")
                .or_else(|| line.strip_prefix("const "))
                .or_else(|| line.trim().strip_prefix("ARG "))?
                .strip_prefix(name)?;
            let value = rest.split(['=', ';']).nth(1)?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("{name} not found"))
}

#[test]
fn dockerfile_pins_the_toolchains_the_build_uses() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let setup = read("xtask/src/setup.rs");
    let channel = read("rust-toolchain.toml")
        .lines()
        .find_map(|l| Some(l.strip_prefix("channel = ")?.trim_matches('"').to_owned()))
        .unwrap();
    assert_eq!(pinned(&dockerfile, "RUST_VERSION"), channel);
    assert_eq!(
        pinned(&dockerfile, "EBPF_TOOLCHAIN"),
        pinned(&read("pymem-agent/build.rs"), "EBPF_TOOLCHAIN")
    );
    for name in [
        "EBPF_TOOLCHAIN",
        "BPF_LINKER_VERSION",
        "BPF_LINKER_LLVM_FEATURE",
    ] {
        assert_eq!(pinned(&dockerfile, name), pinned(&setup, name), "{name}");
    }
    assert!(dockerfile.contains("cargo build --release --locked -p pymem-agent"));
}

// ---------------------------------------------------------------------------
// Pod attribution, live

/// A kubelet-style pod and container cgroup (systemd driver, containerd)
/// under the cgroup v2 hierarchy, removed on drop.
struct KubeletCgroup {
    /// kubepods.slice ... the container's scope, outermost first; the
    /// first two are shared by concurrent tests.
    dirs: Vec<PathBuf>,
    container: PathBuf,
    pod_uid: String,
    container_id: String,
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
/// on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split_whitespace().nth(4)?;
        (after.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
    })
}

impl KubeletCgroup {
    /// `seed` keeps concurrent tests' pods apart.
    fn create(seed: u32) -> Option<Self> {
        let root = cgroup2_mount()?;
        let pod_uid = format!("{seed:08x}-0000-4000-8000-{:012x}", std::process::id());
        let container_id = format!("{seed:08x}{:056x}", u64::from(std::process::id()));
        let mut dir = root.clone();
        let mut dirs = Vec::new();
        for component in [
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{}.slice", pod_uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ] {
            dir.push(component);
            if !dir.exists() {
                fs::create_dir(&dir).ok()?;
            }
            dirs.push(dir.clone());
        }
        Some(Self {
            dirs,
            container: dir,
            pod_uid,
            container_id,
        })
    }

    fn move_in(&self, pid: u32) {
        fs::write(self.container.join("cgroup.procs"), pid.to_string()).unwrap();
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cgroup.contains(&self.container_id), "{cgroup}");
    }
}

impl Drop for KubeletCgroup {
    /// Kills what is still in the container (only this test's processes),
    /// removes the pod's cgroups, and the shared parents once empty.
    fn drop(&mut self) {
        crate::common::cgroup::kill_all_in(&self.container);
        for (depth, dir) in self.dirs.iter().enumerate().rev() {
            let attempts = if depth >= 2 { 50 } else { 1 };
            for _ in 0..attempts {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The `pymem_heap_bytes` series of `pid` in the agent's metrics.
fn heap_series(metrics: &str, pid: u32) -> Option<&str> {
    let pid_label = format!("pid=\"{pid}\"");
    metrics
        .lines()
        .find(|l| l.starts_with("pymem_heap_bytes{") && l.contains(&pid_label))
}

/// memwork.py moved into a new kubelet-style cgroup (`seed` as in
/// `KubeletCgroup::create`); `None` without a writable cgroup v2 hierarchy.
fn workload_in_kubelet_cgroup(python: &Path, seed: u32) -> Option<(Workload, KubeletCgroup)> {
    let work = Workload::spawn(python);
    let cgroup = KubeletCgroup::create(seed)?;
    cgroup.move_in(work.pid);
    Some((work, cgroup))
}

const POD_LABELS: &str = "pid,comm,python_version,namespace,pod,container";

#[test]
fn a_python_process_in_a_kubelet_cgroup_has_its_container_id_and_no_pod_without_the_api() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (work, cgroup) = require!(
        workload_in_kubelet_cgroup(&python, 0x0a11ce),
        "a writable cgroup v2 hierarchy"
    );
    let agent = Agent::start(&["--labels", POD_LABELS, "--kubernetes", "never"]);
    let process = agent.wait_for(work.pid, Duration::from_secs(10));
    assert_eq!(
        process.container_info.container_id.as_deref(),
        Some(cgroup.container_id.as_str()),
        "{process:?}"
    );
    // Unknown fields are left out of the JSON, not written as null: checked
    // on its raw shape.
    let process = agent.process_json(work.pid).unwrap();
    for absent in ["namespace", "pod", "container"] {
        assert!(
            process.get(absent).is_none(),
            "{absent} without the API: {process}"
        );
    }
    // Labels no process has are left out, not exported empty.
    let metrics = agent.metrics();
    let line = heap_series(&metrics, work.pid)
        .unwrap_or_else(|| panic!("no heap series for pid {}:\n{metrics}", work.pid));
    assert!(
        !line.contains("pod=") && !line.contains("namespace="),
        "{line}"
    );
    drop(work);
    drop(cgroup);
}

/// Serves one node's pods over the Kubernetes list + watch protocol, the
/// way the API server does (none runs here): the list, then a watch that
/// stays open.
struct PodApi {
    url: String,
    queries: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl PodApi {
    fn serve(pods: Vec<Value>) -> Self {
        use axum::{extract::RawQuery, response::IntoResponse, routing::get};
        use futures::StreamExt as _;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let queries: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = queries.clone();
        let handler = move |RawQuery(query): RawQuery| {
            let pods = pods.clone();
            let seen = seen.clone();
            async move {
                let query = query.unwrap_or_default();
                seen.lock().unwrap().push(query.clone());
                if query.contains("watch=true") {
                    let open_forever = futures::stream::pending::<Result<String, std::io::Error>>();
                    return axum::body::Body::from_stream(open_forever.boxed()).into_response();
                }
                axum::Json(json!({
                    "apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "1"}, "items": pods,
                }))
                .into_response()
            }
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/api/v1/pods", get(handler));
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            queries,
            _runtime: runtime,
        }
    }

    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let config = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        });
        fs::write(&path, config.to_string()).unwrap();
        path
    }
}

/// The pod of `cgroup`, as the API server would return it: running on
/// node-a, its `app` container with the cgroup's container ID.
fn pod_of(cgroup: &KubeletCgroup) -> Value {
    let text = read("pymem-agent/tests/fixtures/k8s/pod-running.json");
    let mut pod: Value = serde_json::from_str(&text).unwrap();
    pod["metadata"]["uid"] = json!(cgroup.pod_uid);
    pod["status"]["containerStatuses"][0]["containerID"] =
        json!(format!("containerd://{}", cgroup.container_id));
    pod
}

#[test]
fn a_python_process_in_a_pod_gets_namespace_pod_and_container_from_the_api() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let (work, cgroup) = require!(
        workload_in_kubelet_cgroup(&python, 0x0b0b),
        "a writable cgroup v2 hierarchy"
    );
    let host_work = Workload::spawn(&python); // stays outside pods
    let api = PodApi::serve(vec![pod_of(&cgroup)]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let agent = Agent::start(&[
        "--labels",
        POD_LABELS,
        "--kubernetes",
        "always",
        "--node-name",
        "node-a",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let process = loop {
        let p = agent.wait_for(work.pid, Duration::from_secs(10));
        if p.container_info.container.is_some() || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let pod = &process.container_info;
    assert_eq!(
        pod.container_id.as_deref(),
        Some(cgroup.container_id.as_str()),
        "{process:?}"
    );
    assert_eq!(
        pod.namespace.as_deref(),
        Some("shop"),
        "{process:?}\n{}",
        agent.log()
    );
    assert_eq!(
        pod.pod.as_deref(),
        Some("web-7d9f8b6c5-x2x4q"),
        "{process:?}"
    );
    assert_eq!(pod.container.as_deref(), Some("app"), "{process:?}");
    agent.wait_for(host_work.pid, Duration::from_secs(10));
    // Absent, not null, outside pods: checked on the raw JSON.
    let host = agent.process_json(host_work.pid).unwrap();
    assert!(
        host.get("pod").is_none() && host.get("container_id").is_none(),
        "{host}"
    );
    let metrics = agent.metrics();
    let series = |pid: u32| {
        heap_series(&metrics, pid)
            .unwrap_or_else(|| panic!("no series for {pid}:\n{metrics}"))
            .to_owned()
    };
    let in_pod = series(work.pid);
    for label in [
        r#"namespace="shop""#,
        r#"pod="web-7d9f8b6c5-x2x4q""#,
        r#"container="app""#,
    ] {
        assert!(in_pod.contains(label), "{in_pod}");
    }
    // One set of label names per family: empty for the host process, which
    // Prometheus stores as no label.
    assert!(series(host_work.pid).contains(r#"pod="""#));
    let queries = api.queries.lock().unwrap().clone();
    assert!(
        queries
            .iter()
            .all(|q| q.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "only this node's pods are asked for: {queries:?}"
    );
}

// ---------------------------------------------------------------------------
// The DaemonSet's capabilities, live

/// The agent under exactly the DaemonSet's capabilities (as root, like the
/// pod) observes a Python process through its probes.
#[test]
fn the_daemonsets_capabilities_are_enough_for_the_agent() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    require!(on_path("setpriv").then_some(()), "setpriv (util-linux)");
    let bounding: Vec<String> = daemonset_capabilities()
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    let log = fs::File::create(&log_path).unwrap();
    let mut agent = Command::new("setpriv")
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg(env!("CARGO_BIN_EXE_pymem"))
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--probe-delay",
            "1s",
        ])
        .args(["--kubernetes", "never"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let work = Workload::spawn(&python);
    let url = format!("http://127.0.0.1:{port}/api/v1/processes/{}", work.pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    let observed = loop {
        let answer = ureq::get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok());
        if let Some(p) = answer.and_then(|text| serde_json::from_str::<ProcessInfo>(&text).ok())
            && p.accounting == Accounting::Probes
        {
            break Some(p);
        }
        if Instant::now() > deadline || agent.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    let observed = observed.unwrap_or_else(|| {
        panic!(
            "with capabilities {bounding:?} the agent did not observe pid {}:\n{}",
            work.pid,
            agent_log()
        )
    });
    eprintln!("capabilities {bounding:?}: observed {}", observed.pid);
}

// ---------------------------------------------------------------------------
// A real Prometheus

pub(crate) struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `agent_port` every second as job "pymem-agent" and evaluates
    /// pymem's alert rules every second; data in a temporary directory, on
    /// a free loopback port (never the packaged service's).
    fn start(agent_port: u16) -> Self {
        Self::start_scraping(&format!(
            "  - job_name: pymem-agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ))
    }

    /// As `start`, with `scrape_configs` (YAML list items, indented by two)
    /// as its scrape jobs.
    pub(crate) fn start_scraping(scrape_configs: &str) -> Self {
        ensure_prometheus_package();
        let dir = tempfile::tempdir().unwrap();
        let rules = repo("deploy/prometheus/pymem-alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{scrape_configs}",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get("/-/ready").is_err() {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let text = ureq::get(&url)
            .call()
            .map_err(|e| e.to_string())?
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// An instant query's result vector.
    pub(crate) fn query(&self, expr: &str) -> Vec<Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let answer: Value = serde_json::from_str(
            &ureq::get(&url)
                .query("query", expr)
                .call()
                .unwrap_or_else(|e| panic!("{expr}: {e}"))
                .body_mut()
                .read_to_string()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(expr);
            if !result.is_empty() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} stayed empty for {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `expr` of the dashboard's panels, and the queries inside its
/// template variables' `label_values(...)`.
fn dashboard_expressions() -> (Vec<String>, Vec<(String, String)>) {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/pymem-dashboard.json")).unwrap();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    let nested: Vec<&Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flatten()
        .collect();
    panels.extend(nested);
    let exprs = panels
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let definition = v["definition"].as_str().unwrap();
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {} is not label_values(...)", v["name"]));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            (selector.trim().to_owned(), label.trim().to_owned())
        })
        .collect();
    (exprs, variables)
}

/// Grafana's variables as the dashboard's "All" would expand them, with
/// the drill-down on the leaking process.
fn substitute(expr: &str, pid: u32) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "pymem-agent")
        .replace("$node", ".*")
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$pid", &pid.to_string())
}

/// `expr` without its comparisons against constants (`> 1048576`, `== 1`):
/// what an alert compares, which has data whether or not it fires. Label
/// matchers compare with quoted strings and are kept.
fn without_thresholds(expr: &str) -> String {
    const COMPARISONS: [&str; 6] = ["==", "!=", ">=", "<=", ">", "<"];
    let mut out = String::new();
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if let Some(op) = COMPARISONS.iter().find(|op| rest.starts_with(**op)) {
            let operand = rest[op.len()..].trim_start();
            let number_len = operand
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e'))
                .unwrap_or(operand.len());
            if number_len > 0 {
                out.truncate(out.trim_end().len());
                rest = &operand[number_len..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn summary(result: &[Value]) -> String {
    let first = &result[0];
    let value = first["value"][1].as_str().unwrap_or("?");
    format!(
        "{} series, first {} = {value}",
        result.len(),
        first["metric"]
    )
}

#[test]
fn prometheus_scraping_the_agent_answers_every_dashboard_and_alert_query() {
    let python = require!(pyenv("3.11"), "pyenv 3.11");
    let agent = Agent::start(&["--labels", POD_LABELS]);
    let mut work = Workload::spawn(&python);
    let pid = work.pid;
    agent.wait_for_probes(pid, Duration::from_secs(10));
    let prometheus = Prometheus::start(agent.port);
    // The leak runs while Prometheus scrapes; the agent's 10 s window
    // (tests/integration/common) makes pymem_leak_suspected 1 within ~15 s.
    let leak = std::thread::spawn(move || {
        work.command("leak_small 60 3");
        work
    });
    prometheus.wait_for(
        &format!("pymem_leak_suspected{{pid=\"{pid}\"}} == 1"),
        Duration::from_secs(45),
    );
    // A few more scrapes so that rates have two points within [1m].
    std::thread::sleep(Duration::from_secs(3));

    let mut report = BTreeMap::new();
    let (panel_exprs, variables) = dashboard_expressions();
    for expr in &panel_exprs {
        let query = substitute(expr, pid);
        let result = prometheus.query(&query);
        assert!(
            !result.is_empty(),
            "dashboard query returned nothing: {query}"
        );
        report.insert(format!("dashboard: {query}"), summary(&result));
    }
    for (selector, label) in &variables {
        let query = substitute(selector, pid);
        let result = prometheus.query(&query);
        assert!(
            !result.is_empty(),
            "variable query returned nothing: {query}"
        );
        let has_label = result.iter().any(|r| r["metric"].get(label).is_some());
        let expected = !matches!(label.as_str(), "node" | "namespace" | "pod");
        assert!(
            has_label || !expected,
            "label_values({query}, {label}): no {label} label"
        );
        let note = if has_label {
            ""
        } else {
            " (label absent outside Kubernetes)"
        };
        report.insert(
            format!("variable: label_values({query}, {label})"),
            format!("{}{note}", summary(&result)),
        );
    }

    let rules = yaml(&read("deploy/prometheus/pymem-alerts.yml"));
    for rule in rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        let result = prometheus.query(expr);
        let (query, how) = if result.is_empty() {
            (without_thresholds(expr), "thresholds removed")
        } else {
            (expr.to_owned(), "as written: firing condition true")
        };
        let result = if result.is_empty() {
            prometheus.query(&query)
        } else {
            result
        };
        assert!(!result.is_empty(), "alert {name}: {query} returned nothing");
        if name == "PythonMemoryLeakSuspected" {
            assert_eq!(
                how, "as written: firing condition true",
                "the leak is seen as such"
            );
        }
        report.insert(format!("alert {name} ({how}): {query}"), summary(&result));
    }

    // Prometheus itself evaluates the rule file: the leak alert is pending
    // (it fires after `for: 15m`).
    let pid_label = pid.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let state = loop {
        let alerts = prometheus.get("/api/v1/alerts").unwrap();
        let leak = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "PythonMemoryLeakSuspected"
                    && a["labels"]["pid"].as_str() == Some(pid_label.as_str())
            })
            .cloned();
        if let Some(leak) = leak {
            break leak["state"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "leak alert never pending: {alerts}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(state == "pending" || state == "firing", "{state}");
    report.insert(
        "Prometheus rule evaluation: PythonMemoryLeakSuspected".into(),
        state,
    );

    for (query, result) in &report {
        eprintln!("{query}\n    -> {result}");
    }
    eprintln!("{} expressions checked", report.len());
    drop(leak.join().unwrap());
}

#[test]
fn thresholds_are_removed_from_alert_expressions() {
    assert_eq!(
        without_thresholds("up{job=\"pymem-agent\"} == 0"),
        "up{job=\"pymem-agent\"}"
    );
    assert_eq!(
        without_thresholds("rate(pymem_events_lost_total[5m]) > 0"),
        "rate(pymem_events_lost_total[5m])"
    );
    assert_eq!(
        without_thresholds("pymem_heap_bytes > 1073741824 and pymem_leak_suspected == 1"),
        "pymem_heap_bytes and pymem_leak_suspected"
    );
    assert_eq!(
        without_thresholds("a{b=~\"c\", d!=\"e\"} >= 2"),
        "a{b=~\"c\", d!=\"e\"}"
    );
}
