//! Which container a process runs in, from `/proc/PID/cgroup`.
//!
//! Container runtimes name a container's cgroup after its ID, and the
//! kubelet names a pod's cgroup after the pod UID. Examples of the last path
//! components, by runtime and cgroup driver:
//!
//! | driver   | runtime    | path (v1 and v2 alike)                                            |
//! |----------|------------|-------------------------------------------------------------------|
//! | systemd  | containerd | `kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`    |
//! | systemd  | CRI-O      | `kubepods-pod<uid_>.slice/crio-<id>.scope`                        |
//! | systemd  | docker     | `kubepods-besteffort-pod<uid_>.slice/docker-<id>.scope`, `system.slice/docker-<id>.scope` |
//! | cgroupfs | containerd | `kubepods/burstable/pod<uid>/<id>`                                |
//! | cgroupfs | CRI-O      | `kubepods/pod<uid>/crio-<id>`                                     |
//! | cgroupfs | docker     | `kubepods/besteffort/pod<uid>/<id>`, `docker/<id>`                |
//!
//! (`<uid_>`: the systemd driver writes the UID's dashes as underscores.)
//! Paths are relative to the reader's cgroup namespace, so an agent in a
//! container may see `/../../kubepods-…`: only the components matter here.
use std::fmt;

use procfs::{FromBufRead as _, ProcessCGroups};

/// A container runtime, as named in its cgroup paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
        })
    }
}

/// The container a process belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    /// `None` when the cgroupfs driver names the container by its bare ID,
    /// which containerd and docker both do.
    pub runtime: Option<Runtime>,
    /// 64 lowercase hex digits, as in a pod's `containerStatuses[].containerID`.
    pub id: String,
    /// The pod's UID (with dashes), when the process is in a Kubernetes pod.
    pub pod_uid: Option<String>,
}

/// The container of the process whose `/proc/PID/cgroup` reads `text`, or
/// `None` for a process outside containers. The cgroup v2 line is preferred;
/// on v1 (and hybrid) hosts every controller's line names the same path.
pub fn parse(text: &str) -> Option<ContainerRef> {
    in_cgroups(&ProcessCGroups::from_buf_read(text.as_bytes()).ok()?)
}

/// Reads `/proc/PID/cgroup`; `None` outside containers or when the process
/// is gone.
pub fn of_process(pid: u32) -> Option<ContainerRef> {
    in_cgroups(
        &procfs::process::Process::new(pid as i32)
            .ok()?
            .cgroups()
            .ok()?,
    )
}

fn in_cgroups(cgroups: &ProcessCGroups) -> Option<ContainerRef> {
    let unified = cgroups.0.iter().filter(|cgroup| cgroup.hierarchy == 0);
    let legacy = cgroups.0.iter().filter(|cgroup| cgroup.hierarchy != 0);
    unified
        .chain(legacy)
        .find_map(|cgroup| container_in_path(&cgroup.pathname))
}

/// The innermost container named in one cgroup path (innermost, so that a
/// pod in a kind node, itself a docker container, is the pod's container).
fn container_in_path(path: &str) -> Option<ContainerRef> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let (index, (runtime, id)) = components
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, component)| container_component(component).map(|found| (i, found)))?;
    // The pod's cgroup is the container's parent.
    let parent = index.checked_sub(1).map(|parent| components[parent]);
    let pod_uid = parent.and_then(pod_uid_component);
    let runtime = match runtime {
        Some(runtime) => Some(runtime),
        None if parent == Some("docker") => Some(Runtime::Docker),
        None if pod_uid.is_some() => None,
        // A bare 64-hex name outside kubepods/ or docker/ could be anything.
        None => return None,
    };
    Some(ContainerRef {
        runtime,
        id: id.to_owned(),
        pod_uid,
    })
}

/// A container's own cgroup name: the runtime (when the name tells) and ID.
fn container_component(component: &str) -> Option<(Option<Runtime>, &str)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    // conmon, CRI-O's monitor process, has a scope of its own.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let prefixed = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ];
    for (prefix, runtime) in prefixed {
        if let Some(id) = name.strip_prefix(prefix) {
            return is_container_id(id).then_some((Some(runtime), id));
        }
    }
    // cgroupfs driver: the bare ID, and no `.scope`.
    (name == component && is_container_id(name)).then_some((None, name))
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
fn pod_uid_component(component: &str) -> Option<String> {
    let uid = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => component.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&uid).then_some(uid)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A UUID as Kubernetes writes pod UIDs: 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

    #[test]
    fn systemd_containerd_on_cgroup_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse(&text),
            Some(ContainerRef {
                runtime: Some(Runtime::Containerd),
                id: ID.into(),
                pod_uid: Some(UID.into()),
            })
        );
    }

    #[test]
    fn cgroupfs_bare_id_under_a_pod_has_no_runtime() {
        let text = format!("0::/kubepods/besteffort/pod{UID}/{ID}\n");
        let found = parse(&text).unwrap();
        assert_eq!(found.runtime, None);
        assert_eq!(found.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn host_processes_and_lookalikes_are_not_containers() {
        assert_eq!(parse("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        assert_eq!(parse("0::/\n"), None);
        assert_eq!(
            parse(&format!("0::/system.slice/{ID}\n")),
            None,
            "bare id, no pod"
        );
        assert_eq!(
            parse(&format!("0::/system.slice/crio-conmon-{ID}.scope\n")),
            None
        );
        assert_eq!(
            parse("0::/system.slice/docker-1234.scope\n"),
            None,
            "short id"
        );
        assert_eq!(parse(""), None);
    }

    #[test]
    fn pod_uid_only_from_the_containers_parent() {
        let text = format!(
            "0::/kubepods-pod{}.slice/x/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&text).unwrap().pod_uid, None);
    }

    /// `/proc/PID/cgroup` as each runtime and cgroup driver writes it, on
    /// cgroup v1, v2 and hybrid hosts (tests/fixtures/cgroup/).
    #[test]
    fn fixtures_of_every_runtime_and_driver() {
        const FIXTURE_ID: &str = "3f4e1c5b2a6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";
        const FIXTURE_UID: &str = "0b9a8c7d-6e5f-4a3b-9c2d-1e0f2a3b4c5d";
        use Runtime::*;
        /// `None` outside containers, else the runtime and the pod UID.
        type Expected = Option<(Option<Runtime>, Option<&'static str>)>;
        let in_pod = |runtime| Some((runtime, Some(FIXTURE_UID)));
        let cases: &[(&str, Expected)] = &[
            ("containerd-systemd-v2", in_pod(Some(Containerd))),
            ("containerd-systemd-v1", in_pod(Some(Containerd))),
            ("containerd-systemd-hybrid", in_pod(Some(Containerd))),
            ("containerd-systemd-v2-cgroupns", in_pod(Some(Containerd))),
            ("containerd-kind-v2", in_pod(Some(Containerd))),
            ("containerd-cgroupfs-v2", in_pod(None)),
            ("containerd-cgroupfs-v1", in_pod(None)),
            ("crio-systemd-v2", in_pod(Some(CriO))),
            ("crio-systemd-v1", in_pod(Some(CriO))),
            ("crio-cgroupfs-v2", in_pod(Some(CriO))),
            ("crio-cgroupfs-v1", in_pod(Some(CriO))),
            ("docker-systemd-v2", in_pod(Some(Docker))),
            ("docker-systemd-v1", in_pod(Some(Docker))),
            ("docker-cgroupfs-v2", in_pod(None)),
            ("docker-cgroupfs-v1", in_pod(None)),
            ("docker-standalone-systemd-v2", Some((Some(Docker), None))),
            ("docker-standalone-cgroupfs-v1", Some((Some(Docker), None))),
            ("crio-conmon-v2", None),
            ("host-systemd-v2", None),
            ("host-systemd-v1", None),
            ("host-hybrid", None),
        ];
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cgroup");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut named: Vec<String> = cases
            .iter()
            .map(|(name, _)| format!("{name}.txt"))
            .collect();
        named.sort();
        assert_eq!(files, named, "every fixture has an expectation");
        for (name, expected) in cases {
            let text = std::fs::read_to_string(format!("{dir}/{name}.txt")).unwrap();
            let expected = expected.map(|(runtime, pod_uid)| ContainerRef {
                runtime,
                id: FIXTURE_ID.into(),
                pod_uid: pod_uid.map(str::to_owned),
            });
            assert_eq!(parse(&text), expected, "{name}");
        }
    }
}
