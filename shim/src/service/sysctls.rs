//! Sysctls of a spec (`linux.sysctl`): which are allowed, as runc decides
//! (libcontainer/configs/validate), and where they are written.
//!
//! Only sysctls that Linux keeps per namespace are allowed, and only when
//! the spec has that namespace: the IPC ones (`kernel.msgmax`, `msgmnb`,
//! `msgmni`, `sem`, `shmall`, `shmmax`, `shmmni`, `shm_rmid_forced`,
//! `fs.mqueue.*`) with an IPC namespace, `net.*` with a network namespace,
//! `kernel.domainname` with a UTS namespace (`kernel.hostname` conflicts
//! with the spec's hostname), `user.*` with a user namespace. Anything else
//! (`vm.swappiness`, `kernel.panic`) would change the whole kernel, and is
//! refused with an InvalidArgument naming it, before any VM boots.
//!
//! A pod's sysctls (the sandbox spec's, from PodSandboxConfig) are written
//! by the agent in the guest's own namespaces, which every container of the
//! pod shares, right after the VM boots. A pod container's own are written
//! there too (runc writes them in the namespaces it joined, the pod's), and
//! leave its spec: its namespaces are the guest's, in which libcontainer
//! would refuse them. A standalone container's stay in its spec, for
//! libcontainer to write in the container's own namespaces.

use std::collections::BTreeMap;

use clh_agent_protocol::sysctl::{check_value, path_of};
use serde_json::Value;

use super::error::{Error, Result};

/// runc's IPC-namespaced sysctls besides `fs.mqueue.*`.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Whether the spec has a namespace of `kind`, new or joined.
fn has_namespace(spec: &Value, kind: &str) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|ns| ns.get("type").and_then(Value::as_str) == Some(kind))
        })
}

/// Why `name` is refused for `spec`, or `None` when it is allowed.
fn refusal(spec: &Value, name: &str) -> Option<String> {
    let needs = |kind: &str, what: &str| {
        (!has_namespace(spec, kind)).then(|| {
            format!("sysctl {name} is per {what} namespace, and the container has none of its own (it would change the host's)")
        })
    };
    if IPC_SYSCTLS.contains(&name) || name.starts_with("fs.mqueue.") {
        return needs("ipc", "IPC");
    }
    if name.starts_with("net.") {
        return needs("network", "network");
    }
    if name.starts_with("user.") {
        return needs("user", "user");
    }
    if has_namespace(spec, "uts") {
        match name {
            "kernel.domainname" => return None,
            "kernel.hostname" => {
                return Some(format!(
                    "sysctl {name} conflicts with the spec's hostname field: set the pod's hostname instead"
                ))
            }
            _ => {}
        }
    }
    Some(format!(
        "sysctl {name} is not namespaced in Linux: setting it would change the whole kernel, not the pod's namespaces (runc refuses it too). Only kernel.msgmax, kernel.msgmnb, kernel.msgmni, kernel.sem, kernel.shmall, kernel.shmmax, kernel.shmmni, kernel.shm_rmid_forced, fs.mqueue.*, net.* and kernel.domainname may be set; set node-wide sysctls on the node instead"
    ))
}

/// The spec's `linux.sysctl`, each checked by name, value and namespace
/// (see the module doc). Empty when there is none.
pub fn checked(spec: &Value) -> Result<BTreeMap<String, String>> {
    let Some(map) = spec.pointer("/linux/sysctl") else {
        return Ok(BTreeMap::new());
    };
    if map.is_null() {
        return Ok(BTreeMap::new());
    }
    let map = map.as_object().ok_or_else(|| {
        Error::InvalidArgument("malformed OCI spec: linux.sysctl is not an object".into())
    })?;
    let mut out = BTreeMap::new();
    for (name, value) in map {
        let value = value.as_str().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "malformed OCI spec: the value of sysctl {name} is not a string"
            ))
        })?;
        path_of(name)
            .and_then(|_| check_value(name, value))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if let Some(why) = refusal(spec, name) {
            return Err(Error::InvalidArgument(why));
        }
        out.insert(name.clone(), value.to_owned());
    }
    Ok(out)
}

/// A pod container's sysctls, checked against its spec as CRI made it (its
/// namespaces still the pod's) and taken out of it: the shim has the agent
/// write them in the guest's namespaces (see the module doc).
pub fn take_pod_container(spec: &mut Value) -> Result<BTreeMap<String, String>> {
    let sysctls = checked(spec)?;
    if let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("sysctl");
    }
    Ok(sysctls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A sandbox spec as containerd makes it: new IPC, UTS, PID, mount
    /// namespaces and CNI's network namespace.
    fn sandbox(sysctl: Value) -> Value {
        json!({"linux": {
            "sysctl": sysctl,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ],
        }})
    }

    #[test]
    fn namespaced_sysctls_of_a_pod_are_accepted() {
        let spec = sandbox(json!({
            "kernel.shm_rmid_forced": "1",
            "kernel.msgmax": "16384",
            "kernel.sem": "250 32000 100 128",
            "fs.mqueue.msg_max": "20",
            "net.ipv4.ip_unprivileged_port_start": "0",
            "net.ipv4.ping_group_range": "0 2147483647",
            "net.ipv4.conf.eth0/100.forwarding": "1",
            "kernel.domainname": "example.com",
        }));
        let got = checked(&spec).unwrap();
        assert_eq!(got.len(), 8);
        assert_eq!(got["kernel.shm_rmid_forced"], "1");
        assert_eq!(got["net.ipv4.ping_group_range"], "0 2147483647");
        assert!(checked(&json!({})).unwrap().is_empty());
        assert!(checked(&json!({"linux": {"sysctl": null}}))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn sysctls_that_are_not_namespaced_are_refused_by_name() {
        for name in [
            "vm.swappiness",
            "kernel.panic",
            "kernel.pid_max",
            "fs.file-max",
            "kernel.msg_next_id",
        ] {
            let spec = sandbox(json!({ name: "1" }));
            let Err(Error::InvalidArgument(msg)) = checked(&spec) else {
                panic!("{name} accepted");
            };
            assert!(
                msg.contains(name) && msg.contains("not namespaced"),
                "{msg}"
            );
        }
        let Err(Error::InvalidArgument(msg)) = checked(&sandbox(json!({"kernel.hostname": "x"})))
        else {
            panic!("kernel.hostname accepted");
        };
        assert!(msg.contains("hostname"), "{msg}");
    }

    #[test]
    fn a_sysctl_needs_its_namespace() {
        let bare =
            |sysctl: Value| json!({"linux": {"sysctl": sysctl, "namespaces": [{"type": "mount"}]}});
        for (name, ns) in [
            ("kernel.shmmax", "IPC"),
            ("fs.mqueue.queues_max", "IPC"),
            ("net.ipv4.ip_forward", "network"),
            ("user.max_user_namespaces", "user"),
        ] {
            let Err(Error::InvalidArgument(msg)) = checked(&bare(json!({ name: "1" }))) else {
                panic!("{name} accepted without its namespace");
            };
            assert!(msg.contains(name) && msg.contains(ns), "{msg}");
        }
        // Without a UTS namespace, kernel.domainname is the host's.
        assert!(checked(&bare(json!({"kernel.domainname": "x"}))).is_err());
    }

    #[test]
    fn malformed_names_and_values_are_invalid_arguments() {
        for sysctl in [
            json!({"kernel..shmmax": "1"}),
            json!({"net.ipv4.conf.//.x": "1"}),
            json!({"net.IPV4.x": "1"}),
            json!({"net.ipv4.x": 1}),
            json!({"net.ipv4.x": "a\u{0}b"}),
            json!(["kernel.shmmax"]),
        ] {
            let r = checked(&sandbox(sysctl.clone()));
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{sysctl}: {r:?}"
            );
        }
    }

    #[test]
    fn a_pod_container_s_sysctls_leave_its_spec() {
        let mut spec = json!({"linux": {
            "sysctl": {"kernel.shm_rmid_forced": "1"},
            "namespaces": [{"type": "ipc", "path": "/proc/42/ns/ipc"}],
        }});
        let taken = take_pod_container(&mut spec).unwrap();
        assert_eq!(taken["kernel.shm_rmid_forced"], "1");
        assert!(spec["linux"].get("sysctl").is_none(), "{spec}");
    }
}
