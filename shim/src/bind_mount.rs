//! Bind mounts made by file descriptor, with their flags set before they
//! are attached.
//!
//! The source is opened once with every symlink refused (it was
//! canonicalised first, so a symlink met now is a swap in progress), the
//! opened object is checked against where it must not be (the host's
//! /proc, /sys, /dev, a kernel filesystem anywhere), then cloned as a
//! detached mount whose read-only, nosuid and nodev flags and private
//! propagation are set recursively before `move_mount` attaches it. A
//! remount after attaching would not reach the copies already propagated
//! to the VM's export and into virtiofsd's namespace (the CVE-2020-28914
//! class): here they are born read-only. Private: mounts the host makes
//! later below the source never reach the guest. A recursive clone's
//! submounts are trimmed first (submounts.rs): the host's kernel trees and
//! runtime state never come along.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

use crate::mountinfo;
/// Host trees a container must never get through a bind mount: the
/// host's own kernel interfaces and devices (kata#6082, kata#7030).
use crate::submounts::HOST_KERNEL_TREES as FORBIDDEN;
pub use crate::submounts::{LeftOut, SubmountPolicy};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("bind mount source {path:?} cannot be resolved: {error}")]
    Resolve {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("bind mount source {path:?} resolves to {resolved:?}, inside the host's {forbidden}: containers in a VM must not see the host's {forbidden}")]
    Forbidden {
        path: PathBuf,
        resolved: PathBuf,
        forbidden: &'static str,
    },
    #[error("bind mount source {path:?} is on a {fstype} filesystem, a kernel interface of the host: containers in a VM must not see the host's kernel interfaces")]
    KernelFilesystem { path: PathBuf, fstype: String },
    #[error("bind mount source {path:?} changed while it was being mounted (a symlink appeared): {error}")]
    Raced {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot {what} for bind mount source {path:?}: {error}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BindOptions {
    /// `rbind`: submounts of the source come along.
    pub recursive: bool,
    pub readonly: bool,
}

/// The canonical (symlink-free) path of `source`, refused when it lies in
/// the host's /proc, /sys or /dev.
pub fn resolve(source: &Path) -> Result<PathBuf, BindError> {
    let resolved = std::fs::canonicalize(source).map_err(|error| BindError::Resolve {
        path: source.to_path_buf(),
        error,
    })?;
    check_allowed(source, &resolved)?;
    Ok(resolved)
}

fn check_allowed(source: &Path, resolved: &Path) -> Result<(), BindError> {
    match FORBIDDEN.iter().find(|f| resolved.starts_with(f)) {
        Some(forbidden) => Err(BindError::Forbidden {
            path: source.to_path_buf(),
            resolved: resolved.to_path_buf(),
            forbidden,
        }),
        None => Ok(()),
    }
}

/// Bind-mounts `source` at `target` (which must exist) as the module doc
/// says; a recursive bind is prepared and trimmed as `submounts` says.
/// Returns the submounts left out.
pub fn bind(
    source: &Path,
    target: &Path,
    opts: BindOptions,
    submounts: &SubmountPolicy,
) -> Result<Vec<LeftOut>, BindError> {
    let resolved = resolve(source)?;
    let raced = |error: std::io::Error| BindError::Raced {
        path: source.to_path_buf(),
        error,
    };
    let fd = openat2(
        CWD,
        &resolved,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| raced(e.into()))?;
    // What was opened is what gets mounted: check it once more.
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(raced)?;
    check_allowed(source, &opened)?;
    check_filesystem(source, &fd)?;
    let mount_err = |what| {
        move |e: rustix::io::Errno| BindError::Mount {
            what,
            path: source.to_path_buf(),
            error: e.into(),
        }
    };
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if opts.recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = open_tree(&fd, "", flags).map_err(mount_err("clone the mount"))?;
    set_attributes(&tree, opts.readonly).map_err(|error| BindError::Mount {
        what: "set the mount's flags",
        path: source.to_path_buf(),
        error,
    })?;
    // A file has no submounts.
    let is_dir = rustix::fs::fstat(&fd)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
        .map_err(mount_err("inspect the source"))?;
    if opts.recursive && is_dir {
        return submounts
            .attach(&tree, &opened, target)
            .map_err(|error| BindError::Mount {
                what: "attach the mount without the host's kernel and runtime submounts",
                path: source.to_path_buf(),
                error,
            });
    }
    move_mount(
        &tree,
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(mount_err("attach the mount"))?;
    Ok(Vec::new())
}

/// Refuses a source on a kernel filesystem of the host (a cgroup or nsfs
/// mount outside /proc, /sys and /dev).
fn check_filesystem(source: &Path, fd: &OwnedFd) -> Result<(), BindError> {
    let resolve_err = |error| BindError::Resolve {
        path: source.to_path_buf(),
        error,
    };
    let id = mountinfo::mount_id(fd).map_err(resolve_err)?;
    let table = mountinfo::read().map_err(resolve_err)?;
    match table.iter().find(|m| m.id == id) {
        Some(m) if crate::submounts::is_kernel_filesystem(&m.fstype) => {
            Err(BindError::KernelFilesystem {
                path: source.to_path_buf(),
                fstype: m.fstype.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// `mount_setattr(2)` on a detached tree: nosuid and nodev always,
/// read-only when asked, private propagation, on every mount of the tree.
fn set_attributes(tree: &OwnedFd, readonly: bool) -> std::io::Result<()> {
    /// `struct mount_attr` of linux/mount.h.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MS_PRIVATE: u64 = 1 << 18;
    let mut attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if readonly {
        attr_set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from
    // `&attr`, a live, properly laid out `struct mount_attr`; the path is
    // a NUL-terminated empty string; `tree` is an open fd we own for the
    // duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_kernel_trees_are_refused_even_through_dotdot_or_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("evil")).unwrap();
        for source in [
            PathBuf::from("/../proc"),
            PathBuf::from("/proc/../proc/sys"),
            PathBuf::from("//sys"),
            dir.path().join("evil/proc"),
            dir.path().join("evil/dev"),
        ] {
            let err = resolve(&source).unwrap_err();
            assert!(
                matches!(err, BindError::Forbidden { .. }),
                "{source:?}: {err}"
            );
        }
        assert_eq!(
            resolve(dir.path()).unwrap(),
            dir.path().canonicalize().unwrap()
        );
    }

    #[test]
    fn a_read_only_bind_is_read_only_from_birth() {
        if !nix::unistd::geteuid().is_root() {
            clh_test_skip::skip("mounts need root");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("f"), "data").unwrap();
        let target = tempfile::tempdir().unwrap();
        let opts = BindOptions {
            recursive: true,
            readonly: true,
        };
        let policy = SubmountPolicy {
            staging: PathBuf::from("/nonexistent"),
            hidden: Vec::new(),
        };
        let opts = BindOptions {
            recursive: false,
            ..opts
        };
        bind(src.path(), target.path(), opts, &policy).unwrap();
        let read = std::fs::read_to_string(target.path().join("f"));
        let write = std::fs::write(target.path().join("f"), "x");
        nix::mount::umount2(target.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(read.unwrap(), "data");
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            std::fs::read_to_string(src.path().join("f")).unwrap(),
            "data"
        );
    }
}
