//! Where a container's procfs and sysfs go must be a plain directory of its
//! rootfs (or nothing yet), never a symlink.
//!
//! An image whose `/proc` is a symlink steers the procfs mount elsewhere,
//! and with it the masked and read-only paths that protect the kernel's
//! knobs (CVE-2019-16884, CVE-2019-19921). libcontainer refuses some of
//! these, with "failed to prepare rootfs"; checking first, from an fd of
//! the rootfs with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, refuses
//! all of them and says which path and what to fix.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use oci_spec::runtime::Spec;

use super::CtrError;

/// Mount types whose destination is checked.
const KERNEL_FS_TYPES: [&str; 2] = ["proc", "sysfs"];

/// Refuses the spec when the destination of a `proc` or `sysfs` mount is a
/// symlink, passes through one, or is not a directory, in `root`. Each
/// step is taken from a descriptor beneath `root`; no link is followed.
pub(super) fn check(spec: &Spec, root: &Path) -> Result<(), CtrError> {
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    let destinations: Vec<&Path> = mounts
        .iter()
        .filter(|m| {
            m.typ()
                .as_deref()
                .is_some_and(|t| KERNEL_FS_TYPES.contains(&t))
        })
        .map(|m| m.destination().as_path())
        .collect();
    if destinations.is_empty() {
        return Ok(());
    }
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root_fd = open(root, flags, Mode::empty())
        .map_err(|e| CtrError::internal(format!("opening rootfs {}", root.display()), e))?;
    for destination in destinations {
        check_one(&root_fd, destination)?;
    }
    Ok(())
}

fn check_one(root: &OwnedFd, destination: &Path) -> Result<(), CtrError> {
    let relative: PathBuf = destination
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let Some(name) = relative.file_name() else {
        return Err(refused(destination, "is the rootfs itself"));
    };
    let internal = |e: Errno| {
        CtrError::internal(
            format!("checking {} in the rootfs", destination.display()),
            e,
        )
    };
    let parent = relative.parent().filter(|p| !p.as_os_str().is_empty());
    let parent_fd = match parent {
        None => None,
        Some(parent) => {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS,
                );
            match openat2(root.as_fd(), parent, how) {
                Ok(fd) => Some(fd),
                // libcontainer makes a missing destination as a directory.
                Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::ELOOP) => return Err(refused(destination, "passes through a symlink")),
                Err(Errno::ENOTDIR) => return Err(refused(destination, "passes through a file")),
                Err(e) => return Err(internal(e)),
            }
        }
    };
    let dir = parent_fd.as_ref().map_or(root.as_fd(), |fd| fd.as_fd());
    match readlinkat(dir, name) {
        Ok(target) => {
            let why = format!("is a symlink to {}", target.to_string_lossy());
            return Err(refused(destination, &why));
        }
        Err(Errno::ENOENT) => return Ok(()),
        // EINVAL: not a symlink.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(internal(e)),
    }
    let stat = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(internal)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        Ok(())
    } else {
        Err(refused(destination, "is not a directory"))
    }
}

fn refused(destination: &Path, why: &str) -> CtrError {
    CtrError::InvalidArgument(format!(
        "the container's rootfs is unsafe: {} {why}; procfs and sysfs are \
         mounted only on a plain directory of the image (fix the image: make \
         {} an empty directory)",
        destination.display(),
        destination.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{MountBuilder, SpecBuilder};
    use std::os::unix::fs::symlink;

    fn spec_with_proc_at(destination: &str) -> Spec {
        let proc = MountBuilder::default()
            .destination(destination)
            .typ("proc")
            .source("proc")
            .build()
            .expect("a proc mount");
        SpecBuilder::default()
            .mounts(vec![proc])
            .build()
            .expect("a spec")
    }

    fn message(r: Result<(), CtrError>) -> String {
        match r {
            Err(CtrError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_or_a_missing_destination_passes() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("proc")).expect("mkdir");
        check(&spec_with_proc_at("/proc"), root.path()).expect("a plain /proc");
        check(&spec_with_proc_at("/sys/x"), root.path()).expect("a missing destination");
    }

    #[test]
    fn a_symlinked_destination_is_refused_naming_it_and_its_target() {
        let root = tempfile::tempdir().expect("tempdir");
        for (n, target) in ["/", "../../..", "dev"].into_iter().enumerate() {
            let name = format!("proc{n}");
            symlink(target, root.path().join(&name)).expect("symlink");
            let m = message(check(&spec_with_proc_at(&format!("/{name}")), root.path()));
            assert!(
                m.contains(&format!("/{name} is a symlink to {target};")),
                "{m}"
            );
        }
    }

    #[test]
    fn a_destination_through_a_symlinked_directory_or_a_file_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("real")).expect("mkdir");
        symlink("real", root.path().join("link")).expect("symlink");
        std::fs::write(root.path().join("file"), "").expect("file");
        let m = message(check(&spec_with_proc_at("/link/proc"), root.path()));
        assert!(m.contains("/link/proc passes through a symlink"), "{m}");
        let m = message(check(&spec_with_proc_at("/file"), root.path()));
        assert!(m.contains("/file is not a directory"), "{m}");
    }
}
