//! The VM's shared directory as a mount point with shared propagation.

use std::path::Path;

use anyhow::Context;

/// Makes `shared` a bind mount of itself with shared propagation, so that
/// the rootfs mounts made under it after virtiofsd has entered its own mount
/// namespace (sandbox=namespace) reach virtiofsd too. Needs CAP_SYS_ADMIN;
/// without it (unprivileged tests) the VM still boots, without containers.
pub fn make_shared_mount(shared: &Path) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    if !nix::unistd::geteuid().is_root() {
        tracing::debug!("not root: the shared directory is not a mount point");
        return Ok(());
    }
    mount(
        Some(shared),
        shared,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("cannot bind-mount {}", shared.display()))?;
    if let Err(e) = mount(
        None::<&str>,
        shared,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        unmount_shared(shared);
        return Err(e).with_context(|| format!("cannot make {} a shared mount", shared.display()));
    }
    Ok(())
}

/// Lazily unmounts `shared` and everything under it (a rootfs left behind
/// included), so that removing the directory never reaches into a mount.
/// Not following symlinks: the guest writes under it.
pub fn unmount_shared(shared: &Path) {
    use nix::mount::{umount2, MntFlags};
    while umount2(shared, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_ok() {}
}
