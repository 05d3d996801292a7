//! The container's rootfs on the host: the snapshotter's mounts, mounted
//! under the VM's shared directory, and unmounted without following links.

use std::path::{Path, PathBuf};

use anyhow::Context;
use containerd_shim_protos::api::Mount;
use nix::mount::MntFlags;

use super::error::{Error, Result};

/// `<vmdir>/shared/<cid>/rootfs`.
pub fn host_path(vm_dir: &Path, container_id: &str) -> PathBuf {
    vm_dir.join("shared").join(container_id).join("rootfs")
}

/// Mounts `mounts` (containerd sends one, usually overlay) at `target`.
/// Without mounts the bundle's own `rootfs/` directory is bind-mounted.
pub async fn mount(mounts: &[Mount], bundle: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    match mounts {
        [] => {
            let source = bundle.join("rootfs");
            if !source.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "no rootfs: the request has no mounts and {} is not a directory",
                    source.display()
                )));
            }
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

async fn mount_one(m: &Mount, target: &Path) -> Result<()> {
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
