//! Leaves the initramfs for a tmpfs root, once, first thing at boot.
//!
//! The kernel starts us on "rootfs", the initial ramfs, which pivot_root(2)
//! refuses (EINVAL). Containers must enter their rootfs with pivot_root:
//! the fallback, move-mount + chroot, leaves the guest's own root (the
//! agent, every container's rootfs under /run/clh/shared) reachable by
//! `..` from a container that holds CAP_SYS_CHROOT. So PID 1 copies the
//! initramfs (the agent and its modules, a few MiB) into a tmpfs, frees the
//! old files, moves the tmpfs over `/`, chroots into it and re-executes
//! itself there: what switch_root(8) does.

use anyhow::Context;
use nix::mount::{mount, MsFlags};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

const NEW_ROOT: &str = "/.newroot";
/// Set in the environment of the re-executed agent.
const SWITCHED: &str = "CLH_ROOT_SWITCHED";

/// Whether this PID 1 still runs on the initramfs.
pub fn needed() -> bool {
    std::env::var_os(SWITCHED).is_none()
}

/// Switches and re-executes `/init`; returns only on failure.
pub fn switch_and_reexec() -> anyhow::Error {
    match switch() {
        Ok(()) => {
            let err = std::process::Command::new("/init")
                .args(std::env::args_os().skip(1))
                .env(SWITCHED, "1")
                .exec();
            anyhow::Error::new(err).context("re-executing /init on the new root")
        }
        Err(e) => e.context("switching from the initramfs to a tmpfs root"),
    }
}

fn switch() -> anyhow::Result<()> {
    std::fs::create_dir_all(NEW_ROOT).context("creating the new root")?;
    let none: Option<&str> = None;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mounting tmpfs on the new root")?;
    copy_tree(Path::new("/"), Path::new(NEW_ROOT)).context("copying the initramfs")?;
    free_old_root();
    std::env::set_current_dir(NEW_ROOT).context("chdir to the new root")?;
    mount(Some("."), "/", none, MsFlags::MS_MOVE, none).context("moving the new root to /")?;
    nix::unistd::chroot(".").context("chroot to the new root")?;
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

/// Directories, regular files (with their modes) and symlinks. Device
/// nodes are skipped: /dev is a devtmpfs later, and the console fds the
/// kernel opened for us stay open.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        if src == Path::new(NEW_ROOT) {
            continue;
        }
        let dst = to.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_dir() {
            std::fs::create_dir_all(&dst)?;
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        }
    }
    Ok(())
}

/// Deletes the initramfs's files (its memory is not otherwise freed).
/// Best effort: a leftover costs memory, not correctness.
fn free_old_root() {
    let Ok(entries) = std::fs::read_dir("/") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == Path::new(NEW_ROOT) {
            continue;
        }
        let _ = match entry.file_type() {
            Ok(ft) if ft.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_files_modes_and_links() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("lib/modules")).unwrap();
        std::fs::write(a.path().join("init"), b"agent").unwrap();
        let exec = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(a.path().join("init"), exec).unwrap();
        std::fs::write(a.path().join("lib/modules/m.ko"), b"ko").unwrap();
        std::os::unix::fs::symlink("init", a.path().join("link")).unwrap();
        copy_tree(a.path(), b.path()).unwrap();
        let mode = std::fs::metadata(b.path().join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read(b.path().join("lib/modules/m.ko")).unwrap(),
            b"ko"
        );
        assert_eq!(
            std::fs::read_link(b.path().join("link")).unwrap(),
            Path::new("init")
        );
    }
}
