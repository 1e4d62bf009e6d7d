//! Container and Kubernetes pod attribution of observed processes:
//! PID -> container ID (from `/proc/PID/cgroup`) -> pod, namespace and
//! container name (from a watched cache of this node's pods).
pub mod cgroup;
pub mod pods;

use std::path::Path;

use anyhow::{Context as _, Result};
use log::{info, warn};

pub use cgroup::ContainerRef;
pub use pods::{PodCache, PodRef};

use crate::model::ContainerInfo;

/// When the agent watches the Kubernetes API for pod names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    /// Only inside a cluster (`KUBERNETES_SERVICE_HOST` is set).
    Auto,
    /// Always: in a cluster with the service account, elsewhere with the
    /// kubeconfig (development); failing to connect is an error.
    Always,
    /// Never: container IDs only.
    Never,
}

/// Starts the pod cache when `mode` asks for it. In `auto` mode a failure
/// only costs the pod names, so it is logged and the agent goes on.
pub async fn start_pod_cache(
    mode: KubernetesMode,
    node_name: Option<&str>,
    kubeconfig: Option<&Path>,
) -> Result<Option<PodCache>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if mode == KubernetesMode::Never || (mode == KubernetesMode::Auto && !in_cluster) {
        return Ok(None);
    }
    let node = match node_name {
        Some(node) => node.to_owned(),
        None => hostname().context("no --node-name (NODE_NAME) and no hostname")?,
    };
    match PodCache::connect(&node, kubeconfig).await {
        Ok(cache) => {
            info!("watching the pods of node {node} for pod attribution");
            Ok(Some(cache))
        }
        Err(e) if mode == KubernetesMode::Auto => {
            warn!("no pod attribution (container IDs only): {e:#}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The kubelet names the node after the host unless told otherwise; the
/// DaemonSet passes the real name through the downward API.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// What is known of one process's container and pod.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    container: Option<ContainerRef>,
    pod: Option<PodRef>,
}

impl Attribution {
    /// The process's container, from its cgroup; read once, when the
    /// process is first observed (runtimes place a container's process in
    /// its cgroup before it execs).
    pub fn of_process(pid: u32) -> Self {
        Self {
            container: cgroup::of_process(pid),
            pod: None,
        }
    }

    /// Looks the pod up until it is known together with the container's
    /// name: the kubelet reports a container's ID a moment after it starts.
    pub fn resolve(&mut self, pods: Option<&PodCache>) {
        let (Some(container), Some(pods)) = (&self.container, pods) else {
            return;
        };
        if self.pod.as_ref().is_some_and(|pod| pod.container.is_some()) {
            return;
        }
        if let Some(found) = pods.lookup(container) {
            self.pod = Some(found);
        }
    }

    pub fn info(&self) -> ContainerInfo {
        ContainerInfo {
            container_id: self.container.as_ref().map(|c| c.id.clone()),
            namespace: self.pod.as_ref().map(|p| p.namespace.clone()),
            pod: self.pod.as_ref().map(|p| p.pod.clone()),
            container: self.pod.as_ref().and_then(|p| p.container.clone()),
        }
    }
}
