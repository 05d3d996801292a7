//! Removing a state directory that may still hold a mount.
//!
//! A VM directory is removed after its mounts were detached, but an unmount
//! can fail (a locked mount in a user namespace) or a mount may be there
//! that the shim did not make. `remove_dir_all` would then delete the files
//! of whatever is mounted. This removal never crosses a mount point: every
//! directory is entered with `openat2(RESOLVE_BENEATH | RESOLVE_NO_XDEV |
//! RESOLVE_NO_SYMLINKS)`, so a mount point (EXDEV) is left as it is, with
//! the directories above it, and named in the error.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("cannot open {path:?} for removal: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{dir:?} was not removed, nor anything on a mount in it: still mounted there: {}; unmount (umount -l) and remove {dir:?}", list(mounts))]
    MountsLeft { dir: PathBuf, mounts: Vec<PathBuf> },
    #[error("cannot remove {}", list(failed))]
    Failed { failed: Vec<PathBuf> },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one walk found that it could not remove.
#[derive(Default)]
struct Left {
    mounts: Vec<PathBuf>,
    failed: Vec<(PathBuf, Errno)>,
}

/// Removes `dir` and what it holds, never crossing into a mount (see the
/// module doc). Missing is fine.
pub fn remove_tree(dir: &Path) -> Result<(), RemoveError> {
    let fd = match open_dir(CWD, dir.as_os_str(), ResolveFlags::NO_SYMLINKS) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => {
            return Err(RemoveError::Open {
                path: dir.to_path_buf(),
                error: e.into(),
            })
        }
    };
    let mut left = Left::default();
    remove_contents(&fd, dir, &mut left);
    drop(fd);
    if left.mounts.is_empty() && left.failed.is_empty() {
        if let Err(e) = std::fs::remove_dir(dir) {
            left.failed.push((
                dir.to_path_buf(),
                Errno::from_io_error(&e).unwrap_or(Errno::IO),
            ));
        }
    }
    if !left.mounts.is_empty() {
        return Err(RemoveError::MountsLeft {
            dir: dir.to_path_buf(),
            mounts: left.mounts,
        });
    }
    if !left.failed.is_empty() {
        for (path, errno) in &left.failed {
            tracing::warn!(path = %path.display(), error = %errno, "cannot remove");
        }
        return Err(RemoveError::Failed {
            failed: left.failed.into_iter().map(|(p, _)| p).collect(),
        });
    }
    Ok(())
}

fn open_dir(
    at: impl std::os::fd::AsFd,
    name: &OsStr,
    resolve: ResolveFlags,
) -> Result<OwnedFd, Errno> {
    openat2(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )
}

/// Removes what directory `fd` (at `path`) holds; what it cannot goes to
/// `left`.
fn remove_contents(fd: &OwnedFd, path: &Path, left: &mut Left) {
    let entries = match Dir::read_from(fd) {
        Ok(entries) => entries,
        Err(e) => {
            left.failed.push((path.to_path_buf(), e));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                left.failed.push((path.to_path_buf(), e));
                return;
            }
        };
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        if name == "." || name == ".." {
            continue;
        }
        let child = path.join(&name);
        let is_dir = match entry.file_type() {
            FileType::Unknown => {
                rustix::fs::statat(fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| FileType::from_raw_mode(st.st_mode).is_dir())
                    .unwrap_or(false)
            }
            t => t.is_dir(),
        };
        if is_dir {
            let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_XDEV | ResolveFlags::NO_SYMLINKS;
            match open_dir(fd, &name, beneath) {
                Ok(sub) => remove_contents(&sub, &child, left),
                // Removed meanwhile by someone else: what we wanted.
                Err(Errno::NOENT) => continue,
                Err(Errno::XDEV) => {
                    left.mounts.push(child);
                    continue;
                }
                Err(e) => {
                    left.failed.push((child, e));
                    continue;
                }
            }
        }
        let flags = if is_dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rustix::fs::unlinkat(fd, name.as_os_str(), flags) {
            Ok(()) | Err(Errno::NOENT) => {}
            // A file bind-mounted over (unlink refuses a mount point), or a
            // directory above a mount point that stays.
            Err(Errno::BUSY) if !is_dir => left.mounts.push(child),
            Err(Errno::NOTEMPTY) if left.mounts.iter().any(|m| m.starts_with(&child)) => {}
            Err(e) => left.failed.push((child, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    #[test]
    fn a_plain_tree_is_removed_without_following_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "k").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vm");
        std::fs::create_dir_all(root.join("private/c1/rootfs")).unwrap();
        std::fs::write(root.join("private/c1/f"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("private/link")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.path().join("keep").exists());
        remove_tree(&root).unwrap();
    }

    #[test]
    fn files_on_a_mount_that_is_still_there_are_never_deleted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounts need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vm");
        let mnt = root.join("private/c1/mounts/0");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(root.join("console.log"), "log").unwrap();
        let none = None::<&str>;
        mount(Some("tmpfs"), &mnt, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        std::fs::write(mnt.join("canary"), "host data").unwrap();
        let err = remove_tree(&root).unwrap_err();
        let canary = std::fs::read_to_string(mnt.join("canary"));
        umount2(&mnt, MntFlags::MNT_DETACH).unwrap();
        assert_eq!(canary.unwrap(), "host data", "deleted through a mount");
        assert!(
            matches!(&err, RemoveError::MountsLeft { mounts, .. } if mounts == std::slice::from_ref(&mnt)),
            "{err}"
        );
        assert!(err.to_string().contains("private/c1/mounts/0"), "{err}");
        // What is not above the mount went.
        assert!(!root.join("console.log").exists());
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }
}
