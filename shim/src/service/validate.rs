//! Checks on what containerd hands us, before anything is started.

use std::path::Path;

use clh_agent_protocol::{check_id, GUEST_SHARED_DIR};
use containerd_shim_protos::protobuf::well_known_types::any::Any;

use super::error::{Error, Result};

/// Container and exec ids name directories and ride in the stdio header:
/// they follow the protocol's one id rule ([`check_id`]), shared with the
/// agent, and a bad one is an InvalidArgument.
pub fn id(what: &str, id: &str) -> Result<()> {
    check_id(id).map_err(|e| Error::InvalidArgument(format!("invalid {what} id {id:?}: {e}")))
}

/// Reads `<bundle>/config.json` as JSON; it must be an object.
pub fn read_spec(bundle: &Path) -> Result<serde_json::Value> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::InvalidArgument(format!("cannot read the OCI spec {}: {e}", path.display()))
    })?;
    parse_spec(&bytes, &path)
}

/// Parses the OCI spec read from `path`; it must be a JSON object.
pub fn parse_spec(bytes: &[u8], path: &Path) -> Result<serde_json::Value> {
    let spec: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        Error::InvalidArgument(format!("malformed OCI spec {}: {e}", path.display()))
    })?;
    if !spec.is_object() {
        return Err(Error::InvalidArgument(format!(
            "malformed OCI spec {}: not a JSON object",
            path.display()
        )));
    }
    Ok(spec)
}

/// Points the spec's root at the rootfs's guest path.
pub fn rewrite_root(spec: &mut serde_json::Value, container_id: &str) -> Result<()> {
    let guest = format!("{GUEST_SHARED_DIR}/{container_id}/rootfs");
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("malformed OCI spec: not a JSON object".into()))?;
    let root = obj.entry("root").or_insert_with(|| serde_json::json!({}));
    let root = root.as_object_mut().ok_or_else(|| {
        Error::InvalidArgument("malformed OCI spec: root is not an object".into())
    })?;
    root.insert("path".into(), serde_json::Value::String(guest));
    Ok(())
}

/// The runtime options we understand: none yet, runc's (containerd sends
/// `io.containerd.runc.v1.Options` when a runtime is configured like runc),
/// whose fields do not apply to a VM and are ignored, and an empty
/// `runtimeoptions.v1.Options` (CRI's generic type). A config path or body
/// in the latter (`ctr --runtime-config-path`) is refused rather than
/// silently ignored.
pub fn runtime_options(options: Option<&Any>) -> Result<()> {
    const RUNC: [&str; 2] = [
        "containerd.runc.v1.Options",
        "io.containerd.runc.v1.Options",
    ];
    const GENERIC: &str = "runtimeoptions.v1.Options";
    let refused = |what: &str| {
        Error::InvalidArgument(format!(
            "unsupported runtime options ({what}): io.containerd.clh.v2 takes its settings from its configuration file (CLH_SHIM_CONFIG), not from runtime options"
        ))
    };
    match options {
        None => Ok(()),
        Some(any) if any.type_url.is_empty() && any.value.is_empty() => Ok(()),
        Some(any) if RUNC.iter().any(|k| any.type_url.ends_with(k)) => Ok(()),
        Some(any) if any.type_url.ends_with(GENERIC) => {
            if generic_options_set(&any.value) {
                Err(refused(
                    "a config path or body in runtimeoptions.v1.Options",
                ))
            } else {
                Ok(())
            }
        }
        Some(any) => Err(refused(&format!("of type {:?}", any.type_url))),
    }
}

/// Whether `runtimeoptions.v1.Options` (type_url = 1, config_path = 2,
/// config_body = 3, all strings) sets a config path or body. Malformed
/// bytes count as set: they are refused.
fn generic_options_set(bytes: &[u8]) -> bool {
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    loop {
        match input.read_raw_tag_or_eof() {
            Ok(None) => return false,
            Ok(Some(tag)) => {
                let field = tag >> 3;
                match input.read_bytes() {
                    Ok(value) if (field == 2 || field == 3) && !value.is_empty() => return true,
                    Ok(_) => {}
                    Err(_) => return true,
                }
            }
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule itself is tested in clh-agent-protocol; here, that a bad
    /// id is an InvalidArgument naming what it was.
    #[test]
    fn a_bad_id_is_an_invalid_argument() {
        for bad in ["", "..", "a/b", &"x".repeat(65)] {
            let Err(e @ Error::InvalidArgument(_)) = id("container", bad) else {
                panic!("{bad:?} accepted");
            };
            assert!(e.to_string().contains("invalid container id"), "{e}");
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        }
        assert!(id("container", "t1").is_ok());
        assert!(id("container", &"0123456789abcdef".repeat(4)).is_ok());
    }

    #[test]
    fn a_malformed_spec_names_the_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{\"root\": ").unwrap();
        let Err(Error::InvalidArgument(msg)) = read_spec(dir.path()) else {
            panic!("accepted");
        };
        assert!(
            msg.contains("malformed OCI spec") && msg.contains("EOF"),
            "{msg}"
        );
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_spec(missing.path()),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_root_points_into_the_shared_directory() {
        let mut spec = serde_json::json!({"root": {"path": "rootfs", "readonly": true}});
        rewrite_root(&mut spec, "t1").unwrap();
        assert_eq!(spec["root"]["path"], "/run/clh/shared/t1/rootfs");
        assert_eq!(spec["root"]["readonly"], true);
    }

    #[test]
    fn unknown_runtime_options_are_refused() {
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert!(runtime_options(None).is_ok());
        assert!(runtime_options(Some(&runc)).is_ok());
        let other = Any {
            type_url: "example.com/Other".into(),
            value: vec![1],
            ..Default::default()
        };
        let Err(Error::InvalidArgument(msg)) = runtime_options(Some(&other)) else {
            panic!("accepted");
        };
        assert!(msg.contains("example.com/Other"), "{msg}");
        // CRI's generic options: empty is fine, a config path is refused.
        let generic = |value: Vec<u8>| Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert!(runtime_options(Some(&generic(Vec::new()))).is_ok());
        let type_only = [vec![0x0a, 3], b"abc".to_vec()].concat();
        assert!(runtime_options(Some(&generic(type_only))).is_ok());
        let path = [vec![0x12, 10], b"/etc/hosts".to_vec()].concat();
        let Err(Error::InvalidArgument(msg)) = runtime_options(Some(&generic(path))) else {
            panic!("a config path was accepted");
        };
        assert!(msg.contains("unsupported runtime options"), "{msg}");
    }
}
