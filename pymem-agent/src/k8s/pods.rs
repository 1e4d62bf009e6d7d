//! The pods of this node, from the Kubernetes API: listed and watched with
//! the field selector `spec.nodeName=<node>` and cached, so that a lookup by
//! container ID never waits on the network.
//!
//! Built on `kube` and `k8s-openapi` rather than a hand-written client over
//! the service-account token: they add about a minute to a clean debug
//! build on 2 cores (measured), and bring what a small client would get
//! subtly wrong: service-account token rotation, the cluster CA, watch
//! resumption from resourceVersion with bookmarks, relisting after `410
//! Gone`, and backoff while the API server is away.
use std::{future::ready, path::Path};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use log::{info, warn};

use super::cgroup::ContainerRef;

/// The pod and container names of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    /// `None` until the kubelet reports the container's ID in the pod's
    /// status (or for a process of the pod outside its containers).
    pub container: Option<String>,
}

/// This node's pods, kept current by a background watch.
#[derive(Clone)]
pub struct PodCache {
    store: reflector::Store<Pod>,
}

impl PodCache {
    /// Connects with `kubeconfig`, else as `kubectl` would (in a cluster:
    /// the pod's service account), and starts watching `node_name`'s pods.
    pub async fn connect(node_name: &str, kubeconfig: Option<&Path>) -> Result<Self> {
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
            }
            None => kube::Config::infer().await?,
        };
        let client = Client::try_from(config).context("connecting to the Kubernetes API")?;
        Ok(Self::watch(client, node_name))
    }

    /// Starts the watch in a background task of the current tokio runtime;
    /// lookups answer from what has arrived so far.
    pub fn watch(client: Client, node_name: &str) -> Self {
        let pods: Api<Pod> = Api::all(client);
        let selector = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let (store, writer) = reflector::store();
        let updates = watcher(pods, selector)
            .default_backoff()
            .modify(keep_only_what_lookups_read)
            .reflect(writer);
        tokio::spawn(updates.for_each(|update| {
            if let Err(e) = update {
                // The watcher retries with backoff; the cache keeps its pods.
                warn!("watching pods: {e}");
            }
            ready(())
        }));
        let ready_store = store.clone();
        let node = node_name.to_owned();
        tokio::spawn(async move {
            if ready_store.wait_until_ready().await.is_ok() {
                info!(
                    "pod cache ready: {} pods on node {node}",
                    ready_store.state().len()
                );
            }
        });
        Self { store }
    }

    /// The pod (and container name) of `container`.
    pub fn lookup(&self, container: &ContainerRef) -> Option<PodRef> {
        find_container(self.store.state().iter().map(AsRef::as_ref), container)
    }
}

/// The pod whose status lists `wanted`'s container ID; failing that, the
/// pod with `wanted`'s pod UID, without a container name.
pub fn find_container<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    wanted: &ContainerRef,
) -> Option<PodRef> {
    let mut same_pod = None;
    for pod in pods {
        if let Some(name) = container_name(pod, &wanted.id) {
            return Some(pod_ref(pod, Some(name)));
        }
        if wanted.pod_uid.is_some() && pod.metadata.uid == wanted.pod_uid {
            same_pod = Some(pod_ref(pod, None));
        }
    }
    same_pod
}

/// The name of the container (regular, init or ephemeral) with `id`.
fn container_name(pod: &Pod, id: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .find(|s| runtime_id(s) == Some(id))
    .map(|s| s.name.clone())
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` -> `<id>`.
fn runtime_id(status: &ContainerStatus) -> Option<&str> {
    Some(status.container_id.as_deref()?.split_once("://")?.1)
}

fn pod_ref(pod: &Pod, container: Option<String>) -> PodRef {
    PodRef {
        namespace: pod.namespace().unwrap_or_default(),
        pod: pod.name_any(),
        container,
    }
}

/// A node runs up to ~110 pods: keep names, UIDs and container statuses,
/// drop the specs and managed fields that make up most of a pod object.
fn keep_only_what_lookups_read(pod: &mut Pod) {
    pod.spec = None;
    pod.managed_fields_mut().clear();
    pod.annotations_mut().clear();
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use axum::{
        Router,
        body::Body,
        extract::{RawQuery, State},
        routing::get,
    };
    use futures::stream;

    use super::*;
    use crate::k8s::cgroup::Runtime;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");

    fn fixture(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn pod(name: &str) -> Pod {
        serde_json::from_value(fixture(name)).unwrap()
    }

    fn container(id: &str, pod_uid: Option<&str>) -> ContainerRef {
        ContainerRef {
            runtime: Some(Runtime::Containerd),
            id: id.into(),
            pod_uid: pod_uid.map(str::to_owned),
        }
    }

    const WEB_UID: &str = "6a3f0c8e-2b1d-4e5f-9a7b-3c2d1e0f9a8b";
    const WEB_APP_ID: &str = "9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c";
    const WEB_SIDECAR_ID: &str = "1f2e3d4c5b6a79880716253443526170819a0b1c2d3e4f5a6b7c8d9e0f1a2b3c";
    const WEB_INIT_ID: &str = "aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233";
    const PENDING_UID: &str = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

    #[test]
    fn containers_are_found_by_id_in_every_kind_of_status() {
        let pods = [pod("pod-running.json"), pod("pod-starting.json")];
        let found = |id| find_container(&pods, &container(id, Some(WEB_UID)));
        let named = |name: &str| PodRef {
            namespace: "shop".into(),
            pod: "web-7d9f8b6c5-x2x4q".into(),
            container: Some(name.into()),
        };
        assert_eq!(found(WEB_APP_ID), Some(named("app")));
        assert_eq!(found(WEB_SIDECAR_ID), Some(named("metrics-sidecar")));
        assert_eq!(found(WEB_INIT_ID), Some(named("migrate")));
    }

    #[test]
    fn a_container_not_yet_in_the_status_gets_its_pod_from_the_uid() {
        let pods = [pod("pod-running.json"), pod("pod-starting.json")];
        let unknown_id = "f".repeat(64);
        assert_eq!(
            find_container(&pods, &container(&unknown_id, Some(PENDING_UID))),
            Some(PodRef {
                namespace: "batch".into(),
                pod: "report-29183340-abcde".into(),
                container: None,
            })
        );
        assert_eq!(find_container(&pods, &container(&unknown_id, None)), None);
    }

    /// The pods an API server would hold, served over the real list + watch
    /// protocol (no API server runs here): the list returns the first pod,
    /// the watch then adds the second and stays open.
    #[derive(Clone)]
    struct FakeApiServer {
        listed: Arc<Vec<serde_json::Value>>,
        watched: Arc<Vec<serde_json::Value>>,
        queries: Arc<Mutex<Vec<String>>>,
    }

    async fn pods_endpoint(
        State(server): State<FakeApiServer>,
        RawQuery(query): RawQuery,
    ) -> axum::response::Response {
        let query = query.unwrap_or_default();
        server.queries.lock().unwrap().push(query.clone());
        if query.contains("watch=true") {
            let events: Vec<Result<String, std::io::Error>> = server
                .watched
                .iter()
                .map(|pod| {
                    Ok(format!(
                        "{}\n",
                        serde_json::json!({"type": "ADDED", "object": pod})
                    ))
                })
                .collect();
            let body = stream::iter(events).chain(stream::pending());
            return axum::response::Response::new(Body::from_stream(body));
        }
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": "1000"},
            "items": *server.listed,
        });
        axum::Json(list).into_response()
    }

    use axum::response::IntoResponse as _;

    #[tokio::test]
    async fn the_cache_lists_then_watches_this_nodes_pods() {
        let server = FakeApiServer {
            listed: Arc::new(vec![fixture("pod-running.json")]),
            watched: Arc::new(vec![fixture("pod-starting.json")]),
            queries: Arc::default(),
        };
        let app = Router::new()
            .route("/api/v1/pods", get(pods_endpoint))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();

        let cache = PodCache::watch(client, "node-a");
        let listed = container(WEB_APP_ID, Some(WEB_UID));
        let watched = container(&"f".repeat(64), Some(PENDING_UID));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cache.lookup(&watched).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "watched pod never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            cache.lookup(&listed).unwrap().container.as_deref(),
            Some("app")
        );
        assert_eq!(cache.lookup(&watched).unwrap().pod, "report-29183340-abcde");

        let queries = server.queries.lock().unwrap().clone();
        assert!(queries.len() >= 2, "a list, then a watch: {queries:?}");
        for query in &queries {
            assert!(
                query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                "every request selects this node's pods: {query}"
            );
        }
    }
}
