//! What a pod's specs mean inside its VM.
//!
//! CRI points a pod container's network, IPC and UTS namespaces at the
//! pause process (`/proc/<pid>/ns/...`, host paths). In the VM the pod is
//! the guest itself: those containers join the guest's own namespaces, so
//! the entries go, and the pod's hostname is the guest's (set at boot from
//! the sandbox spec). A shared PID namespace has no pause process to join
//! in the guest; such a container gets a PID namespace of its own.

use super::error::{Error, Result};

/// Namespaces a pod container shares with the guest when CRI asks to share
/// them with the sandbox.
const GUEST_NAMESPACES: [&str; 3] = ["network", "ipc", "uts"];
/// Size of a pod container's /dev/shm, as CRI's default for the sandbox.
const SHM_SIZE: &str = "size=65536k";

/// The network namespace a VM's spec names: the path of CNI's namespace,
/// a fresh one (no path), or none (the host's).
#[derive(Debug, PartialEq, Eq)]
pub enum NetworkNamespace {
    Path(std::path::PathBuf),
    Fresh,
    Host,
}

pub fn network_namespace(spec: &serde_json::Value) -> NetworkNamespace {
    let namespaces = spec
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let network = namespaces
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"));
    match network
        .and_then(|ns| ns.get("path"))
        .and_then(|p| p.as_str())
    {
        Some(path) if !path.is_empty() => NetworkNamespace::Path(path.into()),
        _ if network.is_some() => NetworkNamespace::Fresh,
        _ => NetworkNamespace::Host,
    }
}

/// A pod sandbox's network namespace, refusing the host's: a VM cannot
/// share the host's network stack (CRI leaves the namespace out of the
/// sandbox's spec for `hostNetwork: true`).
pub fn sandbox_netns(spec: &serde_json::Value) -> Result<Option<std::path::PathBuf>> {
    match network_namespace(spec) {
        NetworkNamespace::Path(path) => Ok(Some(path)),
        NetworkNamespace::Fresh => Ok(None),
        NetworkNamespace::Host => Err(Error::InvalidArgument(
            concat!(
                "the pod asks for the host's network (hostNetwork: true), which a VM pod ",
                "cannot share: its containers run in the VM's own network stack. Run it ",
                "with a runc RuntimeClass, or drop hostNetwork"
            )
            .into(),
        )),
    }
}

/// Adapts a pod container's spec to the guest (see the module doc).
pub fn adapt_container(spec: &mut serde_json::Value) {
    let mut dropped_uts = false;
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(|n| n.as_array_mut())
    {
        namespaces.retain_mut(|ns| {
            let kind = ns.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            let joins = ns
                .get("path")
                .and_then(|p| p.as_str())
                .is_some_and(|p| !p.is_empty());
            if joins && GUEST_NAMESPACES.contains(&kind) {
                dropped_uts |= kind == "uts";
                return false;
            }
            if joins && kind == "pid" {
                tracing::warn!(
                    "a shared PID namespace is not supported in the VM; the container gets its own"
                );
                if let Some(o) = ns.as_object_mut() {
                    o.remove("path");
                }
            }
            true
        });
    }
    if dropped_uts {
        // Setting a hostname needs a UTS namespace of one's own.
        if let Some(o) = spec.as_object_mut() {
            o.remove("hostname");
        }
    }
    // The sandbox's /dev/shm is a host tmpfs; in the guest each container
    // gets a tmpfs of the same default size.
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        for m in mounts.iter_mut() {
            if m.get("destination").and_then(|d| d.as_str()) == Some("/dev/shm") {
                *m = serde_json::json!({
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", SHM_SIZE],
                });
            }
        }
    }
    strip_host_security_labels(spec);
}

/// AppArmor profiles and SELinux labels name policy loaded in the host
/// kernel; the guest kernel has none, and the VM is the isolation boundary.
pub fn strip_host_security_labels(spec: &mut serde_json::Value) {
    if let Some(p) = spec.get_mut("process").and_then(|p| p.as_object_mut()) {
        p.remove("apparmorProfile");
        p.remove("selinuxLabel");
    }
    if let Some(l) = spec.get_mut("linux").and_then(|l| l.as_object_mut()) {
        l.remove("mountLabel");
    }
}

/// The pod's hostname from the sandbox spec, checked here so that a bad
/// one fails the pod before its VM starts (the agent sets it, SetIdentity).
pub fn sandbox_hostname(spec: &serde_json::Value) -> Result<Option<String>> {
    let Some(name) = spec.get("hostname").and_then(|h| h.as_str()) else {
        return Ok(None);
    };
    if name.is_empty() {
        return Ok(None);
    }
    if !clh_agent_protocol::is_valid_hostname(name) {
        return Err(Error::InvalidArgument(format!(
            "invalid pod hostname {name:?}: {}",
            clh_agent_protocol::HOSTNAME_RULE
        )));
    }
    Ok(Some(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sandbox_gets_cni_s_namespace_and_host_network_is_refused() {
        let with = |namespaces: serde_json::Value| json!({"linux": {"namespaces": namespaces}});
        let cni = with(json!([{"type": "network", "path": "/var/run/netns/cni-1"}]));
        assert_eq!(
            sandbox_netns(&cni).unwrap(),
            Some("/var/run/netns/cni-1".into())
        );
        let fresh = with(json!([{"type": "network"}, {"type": "pid"}]));
        assert_eq!(network_namespace(&fresh), NetworkNamespace::Fresh);
        assert_eq!(sandbox_netns(&fresh).unwrap(), None);
        // CRI leaves the network namespace out for hostNetwork: true.
        let host = with(json!([{"type": "pid"}, {"type": "ipc"}]));
        assert_eq!(network_namespace(&host), NetworkNamespace::Host);
        let err = sandbox_netns(&host).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("hostNetwork"), "{err}");
    }

    #[test]
    fn pod_namespaces_become_the_guests_own() {
        let mut spec = json!({
            "hostname": "pod",
            "process": {"apparmorProfile": "cri-containerd.apparmor.d"},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/proc/42/ns/net"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
            ]},
            "mounts": [
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/h"},
            ],
        });
        adapt_container(&mut spec);
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
        assert!(spec.get("hostname").is_none());
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert_eq!(spec["mounts"][0]["type"], "tmpfs");
        assert_eq!(spec["mounts"][1]["source"], "/h");
    }

    #[test]
    fn a_shared_pid_namespace_becomes_a_private_one() {
        let mut spec = json!({"hostname": "keep", "linux": {"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"},
            {"type": "uts"},
        ]}});
        adapt_container(&mut spec);
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        assert_eq!(spec["hostname"], "keep");
    }

    #[test]
    fn hostnames_are_checked_before_the_vm_starts() {
        assert_eq!(
            sandbox_hostname(&json!({"hostname": "web-0"})).unwrap(),
            Some("web-0".into())
        );
        assert_eq!(sandbox_hostname(&json!({})).unwrap(), None);
        for bad in ["a b", "x clh.debug", &"h".repeat(65)] {
            assert!(
                sandbox_hostname(&json!({ "hostname": bad })).is_err(),
                "{bad:?}"
            );
        }
    }
}
