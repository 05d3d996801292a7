//! The VM's shared-directory layout, which a hostile guest cannot abuse.
//!
//! The host mounts container rootfs and volumes only under
//! `<vm>/private/` (which the guest never sees by that name). virtiofsd
//! exports `<vm>/shared/`: a read-only, slave bind of `private/`. So
//! - the guest cannot create, rename or replace anything in the tree the
//!   host mounts into (EROFS): it cannot plant a symlink where a later
//!   host mount or unmount would follow it (CVE-2020-2026, CVE-2020-2024);
//! - each mount made under `private/` after virtiofsd has entered its own
//!   mount namespace still reaches it (`private/` is a shared mount, the
//!   export and virtiofsd's copy of it are its slaves), with its own flags:
//!   a rootfs stays writable, a read-only volume is read-only on the host;
//! - nothing mounted under `shared/` (or in virtiofsd's namespace) ever
//!   propagates back (slave).
//!
//! `<vm>/staging/` is a private self-bind: a recursive bind is attached
//! there while the host's kernel and runtime submounts are cut out of it
//! (submounts.rs), where neither the guest nor any other mount namespace
//! sees it.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the host mounts: `<vm>/private`.
pub fn private_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("private")
}

/// What virtiofsd exports: `<vm>/shared`.
pub fn export_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("shared")
}

/// Where recursive binds are trimmed: `<vm>/staging`.
pub fn staging_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("staging")
}

/// Creates `private/`, `shared/` and `staging/` and mounts them as the
/// module doc says. Needs CAP_SYS_ADMIN; without it (unprivileged tests)
/// they stay plain directories and the VM still boots, without containers.
pub fn make_export(vm_dir: &Path) -> anyhow::Result<()> {
    let (private, export, staging) = (private_dir(vm_dir), export_dir(vm_dir), staging_dir(vm_dir));
    for dir in [&private, &export, &staging] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if !nix::unistd::geteuid().is_root() {
        tracing::debug!("not root: the shared directory is not a mount point");
        return Ok(());
    }
    let made = mount_export(&private, &export).and_then(|()| mount_staging(&staging));
    if made.is_err() {
        if let Err(e) = unmount_export(vm_dir) {
            tracing::error!(error = %e, "undoing the shared directory layout");
        }
    }
    made
}

/// Makes the existing directory `staging` a private self-bind: nothing
/// attached below it propagates anywhere (what [`make_export`] does for
/// `<vm>/staging`).
pub fn mount_staging(staging: &Path) -> anyhow::Result<()> {
    let none = None::<&str>;
    mount(Some(staging), staging, none, MsFlags::MS_BIND, none)
        .and_then(|()| mount(none, staging, none, MsFlags::MS_PRIVATE, none))
        .with_context(|| format!("cannot make {} a private mount", staging.display()))
}

/// Mounts existing directories `private` and `export` as the module doc
/// says (what [`make_export`] does under a VM directory).
pub fn mount_export(private: &Path, export: &Path) -> anyhow::Result<()> {
    let none = None::<&str>;
    let step = |what: &str, r: nix::Result<()>| {
        r.with_context(|| format!("cannot {what} (VM shared directory layout)"))
    };
    // nosuid, nodev: nothing in the share is ever a device or a setuid
    // program for the host (virtiofsd refuses to open special files too).
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    step(
        "bind-mount the private mount tree",
        mount(Some(private), private, none, MsFlags::MS_BIND, none),
    )?;
    step(
        "make the private mount tree shared",
        mount(none, private, none, MsFlags::MS_SHARED, none),
    )?;
    step(
        "bind the export to the private tree",
        mount(Some(private), export, none, MsFlags::MS_BIND, none),
    )?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened;
    step(
        "make the export read-only",
        mount(none, export, none, ro, none),
    )?;
    step(
        "make the export a slave of the private tree",
        mount(none, export, none, MsFlags::MS_SLAVE, none),
    )?;
    Ok(())
}

/// Removes a pod container's directory in the private tree (its `rootfs`
/// and `mounts` mount points, then itself) once its mounts are gone. Not
/// recursive: should a mount have survived, its contents are never touched
/// (the VM's stop detaches and removes it all). Missing is fine.
pub fn remove_container_dir(vm_dir: &Path, container_id: &str) -> anyhow::Result<()> {
    let dir = private_dir(vm_dir).join(container_id);
    for path in [dir.join("rootfs"), dir.join("mounts"), dir.clone()] {
        match std::fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    Ok(())
}

/// Lazily unmounts the export, the private tree and the staging mount with
/// everything under them (a rootfs or volume left behind included). Never
/// follows symlinks. An error names what could not be unmounted; the
/// caller's removal (remove_tree.rs) never crosses into a mount anyway.
pub fn unmount_export(vm_dir: &Path) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for dir in [export_dir(vm_dir), private_dir(vm_dir), staging_dir(vm_dir)] {
        loop {
            match umount2(&dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => continue, // stacked mounts: until none is left
                // Not (or no longer) a mount point; or missing.
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
                Err(e) => {
                    failed.push(format!("{}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cannot unmount {}", failed.join(", "))
    }
}

/// Unmounts the VM directory's mounts (as [`unmount_export`]) and removes
/// it without ever crossing into a mount that is still there: files on a
/// mount that could not be detached are never deleted. The error names
/// what is left.
pub fn remove_vm_dir(vm_dir: &Path) -> anyhow::Result<()> {
    let unmounted = unmount_export(vm_dir);
    let removed = crate::remove_tree::remove_tree(vm_dir);
    match (unmounted, removed) {
        (_, Ok(())) => Ok(()),
        (Ok(()), Err(e)) => Err(e.into()),
        (Err(u), Err(e)) => Err(anyhow::Error::new(e).context(u.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mountinfo_line(path: &Path) -> Option<String> {
        let needle = format!(" {} ", path.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .ok()?
            .lines()
            .find(|l| l.contains(&needle))
            .map(str::to_owned)
    }

    #[test]
    fn the_export_is_a_read_only_slave_that_sees_later_mounts() {
        if !nix::unistd::geteuid().is_root() {
            clh_test_skip::skip("mounts need root");
            return;
        }
        let vm = tempfile::tempdir().unwrap();
        make_export(vm.path()).unwrap();
        let (private, export) = (private_dir(vm.path()), export_dir(vm.path()));
        let line = mountinfo_line(&export).expect("export mounted");
        assert!(line.contains(" ro,") && line.contains("master:"), "{line}");
        // The guest's view is read-only: nothing can be planted.
        let planted = std::os::unix::fs::symlink("/", export.join("c1"));
        assert_eq!(
            planted.unwrap_err().raw_os_error(),
            Some(libc::EROFS),
            "a symlink was planted in the export"
        );
        // A mount made under private/ later shows in the export, writable.
        std::fs::create_dir(private.join("c1")).unwrap();
        let tmpfs = MsFlags::empty();
        mount(
            Some("tmpfs"),
            &private.join("c1"),
            Some("tmpfs"),
            tmpfs,
            None::<&str>,
        )
        .unwrap();
        std::fs::write(export.join("c1/file"), "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(private.join("c1/file")).unwrap(),
            "x"
        );
        unmount_export(vm.path()).unwrap();
        assert!(mountinfo_line(&export).is_none() && mountinfo_line(&private).is_none());
        assert!(!private.join("c1/file").exists(), "the tmpfs survived");
    }
}
