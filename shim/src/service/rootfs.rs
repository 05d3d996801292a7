//! The container's rootfs on the host: the snapshotter's mounts, mounted
//! under the VM's shared directory, and unmounted without following links.

use std::path::{Path, PathBuf};

use anyhow::Context;
use containerd_shim_protos::api::Mount;
use nix::mount::MntFlags;

use super::error::{Error, Result};
use crate::shared_mount::private_dir;

/// `<vmdir>/private/<cid>/rootfs` (the guest sees it in the export).
pub fn host_path(vm_dir: &Path, container_id: &str) -> PathBuf {
    private_dir(vm_dir).join(container_id).join("rootfs")
}

/// The directory to bind-mount when containerd sends no mounts: the spec's
/// `root.path` (`ctr run --rootfs <dir>` makes it absolute; a relative one
/// is under the bundle, as runc reads it), else the bundle's `rootfs/`.
pub fn source_dir(spec: &serde_json::Value, bundle: &Path) -> PathBuf {
    match spec.pointer("/root/path").and_then(|p| p.as_str()) {
        Some(p) if !p.is_empty() => bundle.join(p),
        _ => bundle.join("rootfs"),
    }
}

/// Refuses a request whose rootfs cannot exist, before a VM is booted.
pub fn check_source(mounts: &[Mount], source: &Path) -> Result<()> {
    if mounts.is_empty() && !source.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "no rootfs: the request has no mounts and the spec's root path {} is not a directory",
            source.display()
        )));
    }
    Ok(())
}

/// Mounts `mounts` (containerd sends one, usually overlay) at `target`.
/// Without mounts `source` (see [`source_dir`]) is bind-mounted.
pub async fn mount(mounts: &[Mount], source: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    match mounts {
        [] => {
            check_source(mounts, source)?;
            let m = Mount {
                type_: "bind".into(),
                source: source.to_string_lossy().into_owned(),
                options: vec!["rbind".into(), "rw".into()],
                ..Default::default()
            };
            mount_one(&m, target).await
        }
        [m] => mount_one(m, target).await,
        _ => Err(Error::InvalidArgument(format!(
            "{} rootfs mounts: only one is supported",
            mounts.len()
        ))),
    }
}

/// Mounts one rootfs mount, nosuid and nodev on the host: the guest writes
/// into it (inside the guest its own mount's flags apply, so setuid
/// programs in the container still work there).
async fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let mut m = m.clone();
    m.options
        .extend(["nosuid".to_string(), "nodev".to_string()]);
    let m = &m;
    containerd_shim::asynchronous::util::mount_rootfs(m, target)
        .await
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot mount the rootfs ({} from {:?}) at {}: {e}",
                m.type_,
                m.source,
                target.display()
            ))
        })
}

/// Unmounts `target` if it is a mount point. UMOUNT_NOFOLLOW: the guest can
/// write into the rootfs, and must not make us unmount something else
/// through a symlink; MNT_DETACH: virtiofsd may still hold it open.
pub fn unmount(target: &Path) -> Result<()> {
    let flags = MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH;
    loop {
        match nix::mount::umount2(target, flags) {
            Ok(()) => continue, // stacked mounts: until none is left
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(Error::Internal(anyhow::anyhow!(
                    "cannot unmount the rootfs {}: {e}",
                    target.display()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_root_path_is_the_bind_source() {
        let bundle = Path::new("/b");
        let spec = |p: &str| serde_json::json!({ "root": { "path": p } });
        assert_eq!(source_dir(&spec("/r"), bundle), Path::new("/r"));
        assert_eq!(source_dir(&spec("rootfs"), bundle), Path::new("/b/rootfs"));
        assert_eq!(
            source_dir(&serde_json::json!({}), bundle),
            Path::new("/b/rootfs")
        );
        let err = check_source(&[], Path::new("/nonexistent/r")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/r"), "{err}");
    }
}
