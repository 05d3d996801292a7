//! The spec a container gets in the guest, computed without a VM: Create's
//! steps on the container's spec (create.rs), in its order, with the host
//! side left out (mounting the rootfs and the binds, copying synced
//! volumes: no mount is taken for a synced volume here). It exists for the
//! `oci_spec_to_guest` fuzz target (fuzz/), which checks what a hostile
//! spec can make cross into the guest.

use std::path::Path;

use serde_json::Value;

use super::binds::guest_source;
use super::create::spec_limits;
use super::error::{Error, Result};
use super::{bind_options, pod_spec, sysctls, validate};
use crate::pod::Role;

/// The spec Create would send to the guest for container `container_id`
/// with `config.json` bytes `config_json`; `None` for a pod sandbox, which
/// has no container in the guest (its hostname is checked, as Create
/// checks it for the kernel command line). `is_tmpfs` stands in for the
/// host's statfs of a bind mount's source.
#[doc(hidden)]
pub fn guest_spec(
    config_json: &[u8],
    container_id: &str,
    is_tmpfs: impl Fn(&Path) -> bool,
) -> Result<Option<Value>> {
    validate::id("container", container_id)?;
    let mut spec = validate::parse_spec(config_json, Path::new("config.json"))?;
    let role = Role::of_spec(&spec).map_err(Error::InvalidArgument)?;
    spec_limits(&role, &spec)?;
    match role {
        Role::Sandbox => {
            pod_spec::sandbox_hostname(&spec)?;
            sysctls::checked(&spec)?;
            return Ok(None);
        }
        Role::Container { .. } => {
            sysctls::take_pod_container(&mut spec)?;
            pod_spec::adapt_container(&mut spec);
        }
        Role::Standalone => {
            sysctls::checked(&spec)?;
        }
    }
    bind_options::check_mounts(&spec)?;
    validate::rewrite_root(&mut spec, container_id)?;
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (n, m) in mounts.iter_mut().enumerate() {
            // As if mount n had been synced: its guest copy is the one
            // source in the guest's volume directory that may pass.
            let guest = guest_source(m, container_id, n, true, &is_tmpfs)?;
            if let Some(path) = guest.path(container_id, n) {
                m["source"] = Value::String(path);
            }
        }
    }
    bind_options::guest_propagation(&mut spec);
    Ok(Some(spec))
}
