//! Bind mounts made by file descriptor, with their flags set before they
//! are attached.
//!
//! The source is opened once with every symlink refused (it was
//! canonicalised first, so a symlink met now is a swap in progress), the
//! opened object is checked against where it must not be (the host's
//! /proc, /sys, /dev, a kernel filesystem anywhere), then cloned as a
//! detached mount whose nosuid and nodev flags and propagation are set on
//! every mount of it, and its read-only flag as the spec asks (below),
//! before `move_mount` attaches it. A remount after attaching would not
//! reach the copies already propagated to the VM's export and into
//! virtiofsd's namespace (the CVE-2020-28914 class): here they are born
//! read-only. Private by default: mounts the host makes later below the
//! source never reach the guest; a slave clone (`rslave`, HostToContainer)
//! receives them (see [`Propagation::Slave`]). A recursive clone's
//! submounts are trimmed first (submounts.rs): the host's kernel trees and
//! runtime state never come along.
//!
//! Read-only as runc has it: `ro` makes the bind's own mount read-only and
//! leaves its submounts as they are on the host (a read-write tmpfs below
//! stays writable); `rro` makes every mount of the clone read-only.

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
    /// `ro`: the bind's own mount is read-only; its submounts keep their
    /// host flags unless `recursive_readonly`.
    pub readonly: bool,
    /// `rro`: every mount of the bind is read-only.
    pub recursive_readonly: bool,
    pub propagation: Propagation,
}

/// The propagation of the clone (and each of its submounts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// No mount event crosses in either direction (`rprivate`, the CRI's
    /// default).
    #[default]
    Private,
    /// A slave of the source's peer group (`rslave`, HostToContainer):
    /// a mount the host makes below the source later reaches the clone
    /// (and through the VM's export, the guest); none goes back.
    Slave,
}

/// What [`bind`] attached.
#[derive(Debug, Default)]
pub struct Bound {
    /// The submounts the policy left out.
    pub left_out: Vec<LeftOut>,
    /// The mount points of the bind's direct submounts, relative to its
    /// root (filled only for a read-only, not recursively read-only,
    /// recursive bind: the guest mounts each again read-write, see
    /// service/binds.rs).
    pub submounts: Vec<PathBuf>,
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
pub fn bind(
    source: &Path,
    target: &Path,
    opts: BindOptions,
    submounts: &SubmountPolicy,
) -> Result<Bound, BindError> {
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
    set_attributes(&tree, opts).map_err(|error| BindError::Mount {
        what: "set the mount's flags",
        path: source.to_path_buf(),
        error,
    })?;
    // A file has no submounts.
    let is_dir = rustix::fs::fstat(&fd)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
        .map_err(mount_err("inspect the source"))?;
    if opts.recursive && is_dir {
        let left_out =
            submounts
                .attach(&tree, &opened, target)
                .map_err(|error| BindError::Mount {
                    what: "attach the mount without the host's kernel and runtime submounts",
                    path: source.to_path_buf(),
                    error,
                })?;
        let submounts = if opts.readonly && !opts.recursive_readonly {
            direct_submounts(&tree).map_err(|error| BindError::Mount {
                what: "list the submounts",
                path: source.to_path_buf(),
                error,
            })?
        } else {
            Vec::new()
        };
        return Ok(Bound {
            left_out,
            submounts,
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
    Ok(Bound::default())
}

/// The mount points of the attached `tree`'s direct submounts, relative to
/// its root. A deeper one lies below one of them.
fn direct_submounts(tree: &OwnedFd) -> std::io::Result<Vec<PathBuf>> {
    let root = mountinfo::mount_id(tree)?;
    let table = mountinfo::read()?;
    let Some(root_at) = table.iter().find(|m| m.id == root).map(|m| &m.mount_point) else {
        return Err(std::io::Error::other(format!(
            "the bind (mount {root}) is not in the mount table"
        )));
    };
    let mut out: Vec<PathBuf> = mountinfo::descendants(&table, root)
        .into_iter()
        .filter(|m| m.parent == root)
        .filter_map(|m| m.mount_point.strip_prefix(root_at).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    // Two mounts stacked at one point are one path.
    out.sort();
    out.dedup();
    Ok(out)
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

/// `mount_setattr(2)` on a detached tree: nosuid, nodev and the
/// propagation on every mount of it; read-only on every mount for `rro`,
/// on the tree's own mount only for `ro`.
fn set_attributes(tree: &OwnedFd, opts: BindOptions) -> std::io::Result<()> {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MS_PRIVATE: u64 = 1 << 18;
    const MS_SLAVE: u64 = 1 << 19;
    let mut attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if opts.readonly && opts.recursive_readonly {
        attr_set |= MOUNT_ATTR_RDONLY;
    }
    let propagation = match opts.propagation {
        Propagation::Private => MS_PRIVATE,
        Propagation::Slave => MS_SLAVE,
    };
    mount_setattr(tree, true, attr_set, propagation)?;
    if opts.readonly && !opts.recursive_readonly {
        mount_setattr(tree, false, MOUNT_ATTR_RDONLY, 0)?;
    }
    Ok(())
}

/// One `mount_setattr(2)` call on `tree` (and, if `recursive`, every mount
/// below it): set `attr_set`; `propagation` 0 leaves it unchanged.
fn mount_setattr(
    tree: &OwnedFd,
    recursive: bool,
    attr_set: u64,
    propagation: u64,
) -> std::io::Result<()> {
    /// `struct mount_attr` of linux/mount.h.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from
    // `&attr`, a live, properly laid out `struct mount_attr`; the path is
    // a NUL-terminated empty string; `tree` is an open fd we own for the
    // duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
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
            ..Default::default()
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
    /// runc's `ro` and `rro`: `ro` makes only the bind's own mount
    /// read-only (a read-write tmpfs below stays writable, and is listed
    /// for the guest to mount again); `rro` makes both read-only.
    #[test]
    fn ro_leaves_submounts_writable_and_rro_does_not() {
        use crate::shared_mount::{make_export, private_dir, remove_vm_dir, staging_dir};
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        if !nix::unistd::geteuid().is_root() {
            clh_test_skip::skip("mounts need root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let sub = host.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let none = None::<&str>;
        mount(Some("tmpfs"), &sub, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        let vm = tempfile::tempdir().unwrap();
        make_export(vm.path()).unwrap();
        let policy = SubmountPolicy {
            staging: staging_dir(vm.path()),
            hidden: Vec::new(),
        };
        let mut seen = Vec::new();
        for (name, rro) in [("ro", false), ("rro", true)] {
            let target = private_dir(vm.path()).join(name);
            std::fs::create_dir(&target).unwrap();
            let opts = BindOptions {
                recursive: true,
                readonly: true,
                recursive_readonly: rro,
                ..Default::default()
            };
            let bound = bind(host.path(), &target, opts, &policy);
            let top = std::fs::write(target.join("top"), "x").is_ok();
            let below = std::fs::write(target.join("sub").join(name), "x").is_ok();
            seen.push((name, bound.map(|b| b.submounts), top, below));
        }
        remove_vm_dir(vm.path()).unwrap();
        umount2(&sub, MntFlags::MNT_DETACH).unwrap();
        let [(_, ro_subs, ro_top, ro_below), (_, rro_subs, rro_top, rro_below)] =
            seen.try_into().unwrap();
        assert_eq!(ro_subs.unwrap(), vec![PathBuf::from("sub")]);
        assert!(
            !ro_top && ro_below,
            "ro: top writable {ro_top}, submount writable {ro_below}"
        );
        assert_eq!(rro_subs.unwrap(), Vec::<PathBuf>::new());
        assert!(
            !rro_top && !rro_below,
            "rro: top {rro_top}, submount {rro_below}"
        );
    }
    /// HostToContainer: a slave bind of a shared source receives a mount
    /// the host makes below the source later, in the VM's export too,
    /// which is what virtiofsd serves.
    #[test]
    fn a_slave_bind_receives_later_host_mounts() {
        use crate::shared_mount::{
            export_dir, make_export, private_dir, remove_vm_dir, staging_dir,
        };
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        if !nix::unistd::geteuid().is_root() {
            clh_test_skip::skip("mounts need root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let src = host.path().join("src");
        let late = src.join("late");
        std::fs::create_dir_all(&late).unwrap();
        let none = None::<&str>;
        mount(Some(&src), &src, none, MsFlags::MS_BIND, none).unwrap();
        mount(none, &src, none, MsFlags::MS_SHARED, none).unwrap();
        let vm = tempfile::tempdir().unwrap();
        make_export(vm.path()).unwrap();
        let policy = SubmountPolicy {
            staging: staging_dir(vm.path()),
            hidden: Vec::new(),
        };
        let target = private_dir(vm.path()).join("c1");
        std::fs::create_dir(&target).unwrap();
        let opts = BindOptions {
            recursive: true,
            propagation: Propagation::Slave,
            ..Default::default()
        };
        let bound = bind(&src, &target, opts, &policy);
        mount(Some("tmpfs"), &late, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        std::fs::write(late.join("hello"), "later").unwrap();
        let in_target = std::fs::read_to_string(target.join("late/hello")).ok();
        let exported = std::fs::read_to_string(export_dir(vm.path()).join("c1/late/hello")).ok();
        // Nothing goes back: a mount in the bind stays out of the source.
        let back = target.join("late");
        mount(Some("tmpfs"), &back, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        let host_untouched = late.join("hello").exists();
        remove_vm_dir(vm.path()).unwrap();
        umount2(&src, MntFlags::MNT_DETACH).unwrap();
        bound.unwrap();
        assert_eq!(in_target.as_deref(), Some("later"), "not in the bind");
        assert_eq!(exported.as_deref(), Some("later"), "not in the export");
        assert!(
            host_untouched,
            "a mount in the bind reached the host's source"
        );
    }
}
