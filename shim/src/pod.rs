//! The role a container plays in a pod, read from the annotations that CRI
//! implementations put on its OCI spec. It decides which shim serves a
//! container (`start`), what its Create does, and what `delete` cleans up.

use std::path::Path;

/// containerd's CRI plugin: `sandbox` or `container`.
pub const CONTAINERD_TYPE: &str = "io.kubernetes.cri.container-type";
/// containerd's CRI plugin: the pod sandbox a container belongs to.
pub const CONTAINERD_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI-O's equivalents.
pub const CRIO_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
pub const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No CRI annotations (`ctr run`): a VM of its own.
    Standalone,
    /// The pod sandbox (pause) container: its Create boots the pod's VM;
    /// it runs no process in the guest.
    Sandbox,
    /// One of a pod's containers, created in the VM of `sandbox_id`.
    Container { sandbox_id: String },
}

impl Role {
    /// The role of the container whose spec is `spec`. A container-type
    /// annotation without the sandbox id is an error: routing it anywhere
    /// would be a guess.
    pub fn of_spec(spec: &serde_json::Value) -> Result<Role, String> {
        let annotation = |key: &str| {
            spec.pointer("/annotations")
                .and_then(|a| a.get(key))
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let (kind, sandbox) = match (annotation(CONTAINERD_TYPE), annotation(CRIO_TYPE)) {
            (Some(kind), _) => (kind, annotation(CONTAINERD_SANDBOX_ID)),
            (None, Some(kind)) => (kind, annotation(CRIO_SANDBOX_ID)),
            (None, None) => return Ok(Role::Standalone),
        };
        match kind {
            "sandbox" => Ok(Role::Sandbox),
            "container" => match sandbox {
                Some(id) => Ok(Role::Container {
                    sandbox_id: id.to_string(),
                }),
                None => Err(format!(
                    "the spec marks a pod container but has no {CONTAINERD_SANDBOX_ID} (or {CRIO_SANDBOX_ID}) annotation naming its pod sandbox"
                )),
            },
            other => Err(format!(
                "unknown container type {other:?} in the spec's annotations (expected \"sandbox\" or \"container\")"
            )),
        }
    }

    /// The role recorded in `<bundle>/config.json`.
    pub fn of_bundle(bundle: &Path) -> Result<Role, String> {
        Role::of_spec(&bundle_spec(bundle)?)
    }

    /// The id of the VM (and so of the shim) serving container `id`.
    pub fn vm_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Container { sandbox_id } => sandbox_id,
            Role::Standalone | Role::Sandbox => id,
        }
    }
}

/// `<bundle>/config.json`, parsed.
pub fn bundle_spec(bundle: &Path) -> Result<serde_json::Value, String> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("cannot read the OCI spec {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("malformed OCI spec {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containerd_and_crio_annotations_give_the_role() {
        assert_eq!(Role::of_spec(&json!({})).unwrap(), Role::Standalone);
        let sandbox =
            json!({"annotations": {CONTAINERD_TYPE: "sandbox", CONTAINERD_SANDBOX_ID: "p"}});
        assert_eq!(Role::of_spec(&sandbox).unwrap(), Role::Sandbox);
        let member =
            json!({"annotations": {CONTAINERD_TYPE: "container", CONTAINERD_SANDBOX_ID: "p"}});
        let role = Role::of_spec(&member).unwrap();
        assert_eq!(
            role,
            Role::Container {
                sandbox_id: "p".into()
            }
        );
        assert_eq!(role.vm_id("c"), "p");
        let crio = json!({"annotations": {CRIO_TYPE: "container", CRIO_SANDBOX_ID: "q"}});
        assert_eq!(Role::of_spec(&crio).unwrap().vm_id("c"), "q");
        assert_eq!(Role::Sandbox.vm_id("p"), "p");
    }

    #[test]
    fn a_member_without_its_sandbox_or_an_unknown_type_is_refused() {
        let orphan = json!({"annotations": {CONTAINERD_TYPE: "container"}});
        assert!(Role::of_spec(&orphan)
            .unwrap_err()
            .contains(CONTAINERD_SANDBOX_ID));
        let odd = json!({"annotations": {CONTAINERD_TYPE: "vm"}});
        assert!(Role::of_spec(&odd).unwrap_err().contains("\"vm\""));
    }
}
