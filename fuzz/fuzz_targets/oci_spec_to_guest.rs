//! The container's OCI spec (`config.json`, written by containerd from the
//! pod's spec: hostPath and volume sources, annotations, namespaces,
//! resources, cgroupsPath) through what the shim makes of it for the guest
//! (`containerd_shim_clh_v2::service::guest_spec`) and for the host cgroup
//! (`CgroupsPath::parse`). Input: raw JSON, or a spec built from a valid
//! skeleton with hostile parts. Whatever it says, the guest's spec names no
//! host path: every bind mount's source is the container's own slot of the
//! shared directory, a plain memory volume, or its own synced volume.

#![no_main]

use std::path::Path;

use arbitrary::Arbitrary;
use clh_agent_protocol::{EPHEMERAL_DIR, GUEST_SHARED_DIR, GUEST_VOLUMES_DIR};
use containerd_shim_clh_v2::pod_cgroup::CgroupsPath;
use containerd_shim_clh_v2::service::guest_spec;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw { container_id: Id, json: Vec<u8> },
    Built(Spec),
}

#[derive(Arbitrary, Debug)]
enum Id {
    Plain,
    Other(String),
}

impl Id {
    fn get(&self) -> &str {
        match self {
            Id::Plain => "c1",
            Id::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Role {
    Standalone,
    Sandbox,
    Container(Option<String>),
    CrioContainer(String),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Source {
    /// `<prefix><suffix>` for each prefix the shim or the guest gives meaning.
    GuestVolumes(String),
    GuestShared(String),
    Ephemeral(String),
    EmptyDir(String),
    Host(String),
    Missing,
    NotAString(i64),
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Bind,
    Tmpfs,
    Proc,
    None,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Mount {
    destination: String,
    kind: Kind,
    source: Source,
    options: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    container_id: Id,
    role: Role,
    hostname: Option<String>,
    root: Option<String>,
    namespaces: Vec<(String, Option<String>)>,
    mounts: Vec<Mount>,
    cgroups_path: Option<String>,
    /// cpu.quota, cpu.period, memory.limit
    resources: Option<(i64, i64, i64)>,
    annotations: Vec<(String, String)>,
    /// Which memory-volume sources the host says are tmpfs.
    tmpfs: bool,
}

fn build(s: &Spec) -> Value {
    let mut annotations = Map::new();
    for (k, v) in &s.annotations {
        annotations.insert(k.clone(), json!(v));
    }
    let (kind, sandbox) = match &s.role {
        Role::Standalone => (None, None),
        Role::Sandbox => (Some("sandbox"), None),
        Role::Container(id) => (Some("container"), id.as_deref()),
        Role::CrioContainer(id) => {
            annotations.insert(
                "io.kubernetes.cri-o.ContainerType".into(),
                json!("container"),
            );
            annotations.insert("io.kubernetes.cri-o.SandboxID".into(), json!(id));
            (None, None)
        }
        Role::Other(k) => (Some(k.as_str()), None),
    };
    if let Some(kind) = kind {
        annotations.insert("io.kubernetes.cri.container-type".into(), json!(kind));
    }
    if let Some(id) = sandbox {
        annotations.insert("io.kubernetes.cri.sandbox-id".into(), json!(id));
    }
    let mounts: Vec<Value> = s
        .mounts
        .iter()
        .map(|m| {
            let mut o = Map::new();
            o.insert("destination".into(), json!(m.destination));
            match &m.kind {
                Kind::Bind => o.insert("type".into(), json!("bind")),
                Kind::Tmpfs => o.insert("type".into(), json!("tmpfs")),
                Kind::Proc => o.insert("type".into(), json!("proc")),
                Kind::None => None,
                Kind::Other(t) => o.insert("type".into(), json!(t)),
            };
            let source = match &m.source {
                Source::GuestVolumes(s) => Some(json!(format!("{GUEST_VOLUMES_DIR}{s}"))),
                Source::GuestShared(s) => Some(json!(format!("{GUEST_SHARED_DIR}{s}"))),
                Source::Ephemeral(s) => Some(json!(format!("{EPHEMERAL_DIR}{s}"))),
                Source::EmptyDir(s) => Some(json!(format!(
                    "/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/{s}"
                ))),
                Source::Host(s) => Some(json!(s)),
                Source::Missing => None,
                Source::NotAString(n) => Some(json!(n)),
            };
            if let Some(source) = source {
                o.insert("source".into(), source);
            }
            o.insert("options".into(), json!(m.options));
            Value::Object(o)
        })
        .collect();
    let namespaces: Vec<Value> = s
        .namespaces
        .iter()
        .map(|(t, p)| match p {
            Some(p) => json!({"type": t, "path": p}),
            None => json!({"type": t}),
        })
        .collect();
    let mut linux = json!({ "namespaces": namespaces });
    if let Some(p) = &s.cgroups_path {
        linux["cgroupsPath"] = json!(p);
    }
    if let Some((quota, period, limit)) = s.resources {
        linux["resources"] =
            json!({"cpu": {"quota": quota, "period": period}, "memory": {"limit": limit}});
    }
    let mut spec = json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["sh"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d"},
        "mounts": mounts,
        "linux": linux,
        "annotations": annotations,
    });
    if let Some(h) = &s.hostname {
        spec["hostname"] = json!(h);
    }
    if let Some(r) = &s.root {
        spec["root"] = json!({ "path": r });
    }
    spec
}

fn is_bind(m: &Value) -> bool {
    let opt = |o: &str| {
        m.get("options")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(o)))
    };
    m.get("type").and_then(Value::as_str) == Some("bind") || opt("bind") || opt("rbind")
}

/// A memory volume's source: one plain name below EPHEMERAL_DIR.
fn is_memory_volume(source: &str) -> bool {
    source
        .strip_prefix(EPHEMERAL_DIR)
        .and_then(|s| s.strip_prefix('/'))
        .is_some_and(|name| {
            !name.is_empty()
                && !name.starts_with('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// What the guest's spec may hold: see the module doc.
fn check_guest_spec(spec: &Value, cid: &str) {
    assert_eq!(
        spec.pointer("/root/path").and_then(Value::as_str),
        Some(format!("{GUEST_SHARED_DIR}/{cid}/rootfs").as_str())
    );
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return;
    };
    for (n, m) in mounts.iter().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let source = m.get("source").and_then(Value::as_str).unwrap_or_default();
        let ok = source == format!("{GUEST_SHARED_DIR}/{cid}/mounts/{n}")
            || source == format!("{GUEST_VOLUMES_DIR}/{cid}/{n}")
            || is_memory_volume(source);
        assert!(
            ok,
            "bind mount {n} of {cid} reaches the guest as {source:?}"
        );
    }
}

fn check_pod_container(spec: &Value) {
    assert!(spec.pointer("/process/apparmorProfile").is_none());
    let namespaces = spec.pointer("/linux/namespaces").and_then(Value::as_array);
    for ns in namespaces.into_iter().flatten() {
        let kind = ns.get("type").and_then(Value::as_str).unwrap_or_default();
        let path = ns.get("path").and_then(Value::as_str).unwrap_or_default();
        if ["network", "ipc", "uts", "pid"].contains(&kind) {
            assert!(
                path.is_empty(),
                "the pod's {kind} namespace {path:?} reached the guest"
            );
        }
    }
}

fn check_cgroups_path(spec: &Value) {
    let Some(path) = spec.pointer("/linux/cgroupsPath").and_then(Value::as_str) else {
        return;
    };
    if let Ok(parsed) = CgroupsPath::parse(path) {
        let rel = parsed.relative();
        assert!(
            rel.split('/')
                .all(|p| !p.is_empty() && p != "." && p != ".."),
            "{path:?} names the host cgroup {rel:?}"
        );
    }
}

fn run(json: &[u8], cid: &str, tmpfs: bool) {
    let Ok(original) = serde_json::from_slice::<Value>(json) else {
        let _ = guest_spec(json, cid, |_: &Path| tmpfs);
        return;
    };
    check_cgroups_path(&original);
    let pod_container = original
        .pointer("/annotations/io.kubernetes.cri.container-type")
        .and_then(Value::as_str)
        == Some("container");
    match guest_spec(json, cid, |_: &Path| tmpfs) {
        Ok(Some(spec)) => {
            check_guest_spec(&spec, cid);
            if pod_container {
                check_pod_container(&spec);
            }
        }
        Ok(None) | Err(_) => {}
    }
}

fuzz_target!(|input: Input| match input {
    Input::Raw { container_id, json } => run(&json, container_id.get(), false),
    Input::Built(s) => {
        let json = serde_json::to_vec(&build(&s)).expect("serializing a JSON value");
        run(&json, s.container_id.get(), s.tmpfs);
    }
});
