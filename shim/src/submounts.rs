//! What a recursive bind of a host directory leaves out.
//!
//! `rbind` (every CRI hostPath) clones the source with all its submounts.
//! For hostPath `/`, `/run` or `/var` these include the host's /proc, /sys
//! and /dev, the kernel's pseudo filesystems, other pods' rootfs and
//! volumes under the shim's state directory and runc containers' under
//! containerd's. Refusing such sources would refuse `/` outright, so the
//! bind is made without them, and the caller is told which were left out
//! (the shim logs a warning naming them):
//!
//! 1. the clone is made private before anything else, so that no mount the
//!    host makes later (a new /proc below the source) propagates into it;
//! 2. it is attached under the VM's staging directory, a private mount the
//!    guest never sees (virtiofsd exports only `shared/`);
//! 3. every submount of the clone that is a kernel filesystem or lies in a
//!    hidden host tree is detached by file descriptor: opened beneath the
//!    clone's root with every symlink refused, checked to be that mount
//!    (statx mount id), unmounted through `/proc/self/fd/N`; the table is
//!    read again until none is left;
//! 4. only then is the clone moved to its place in the VM's export.
//!
//! Older kernels cannot unmount inside a detached tree nor mount into one,
//! hence the staging mount rather than working on the detached clone.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{move_mount, unmount, MoveMountFlags, UnmountFlags};

use crate::mountinfo::{self, MountEntry};

/// The host's kernel interfaces and devices: never bound, never carried.
pub const HOST_KERNEL_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Filesystem types that are kernel interfaces of the host, wherever they
/// are mounted.
const KERNEL_FILESYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "mqueue",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "bpf",
    "fusectl",
    "pstore",
    "efivarfs",
    "binfmt_misc",
    "nsfs",
    "selinuxfs",
    "autofs",
    "rpc_pipefs",
];

pub fn is_kernel_filesystem(fstype: &str) -> bool {
    KERNEL_FILESYSTEMS.contains(&fstype)
}

/// Where a recursive bind is prepared and what it leaves out.
#[derive(Debug, Clone)]
pub struct SubmountPolicy {
    /// A directory on a private mount, invisible to the guest (the VM's
    /// `staging/`), where the clone is trimmed before it is moved.
    pub staging: PathBuf,
    /// Host trees, besides [`HOST_KERNEL_TREES`], no mount of which comes
    /// along: the shim's state directory, containerd's.
    pub hidden: Vec<PathBuf>,
}

/// A submount left out of a bind: its host path and filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub path: PathBuf,
    pub fstype: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.fstype)
    }
}

impl SubmountPolicy {
    /// Whether a mount of `fstype` at host path `path` must stay out.
    fn hides(&self, path: &Path, fstype: &str) -> bool {
        is_kernel_filesystem(fstype)
            || HOST_KERNEL_TREES
                .iter()
                .map(Path::new)
                .chain(self.hidden.iter().map(PathBuf::as_path))
                .any(|tree| path.starts_with(tree))
    }

    /// Attaches the detached, private `tree` (a recursive clone of host
    /// directory `source`) at `target` without the submounts this policy
    /// hides, which it returns.
    pub fn attach(
        &self,
        tree: &OwnedFd,
        source: &Path,
        target: &Path,
    ) -> std::io::Result<Vec<LeftOut>> {
        let staged = Staged::attach(tree, &self.staging)?;
        let left_out = self.trim(tree, source)?;
        move_mount(
            tree,
            "",
            CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
        staged.moved_away();
        Ok(left_out)
    }

    /// Detaches the hidden submounts of the attached clone `tree`.
    fn trim(&self, tree: &OwnedFd, source: &Path) -> std::io::Result<Vec<LeftOut>> {
        let root = mountinfo::mount_id(tree)?;
        let mut left_out: Vec<LeftOut> = Vec::new();
        // Each round detaches at least one mount of a finite, private tree
        // (the topmost hidden ones at once: a node may have thousands).
        let mut rounds = mountinfo::descendants(&mountinfo::read()?, root).len() + 1;
        loop {
            let table = mountinfo::read()?;
            let root_at = table
                .iter()
                .find(|m| m.id == root)
                .map(|m| m.mount_point.clone())
                .ok_or_else(|| {
                    other(format!(
                        "the staged clone (mount {root}) is not in the mount table"
                    ))
                })?;
            let below = mountinfo::descendants(&table, root);
            let hidden: Vec<(&MountEntry, PathBuf)> = below
                .iter()
                .filter_map(|m| {
                    let rel = m.mount_point.strip_prefix(&root_at).ok()?;
                    self.hides(&source.join(rel), &m.fstype)
                        .then(|| (*m, rel.to_path_buf()))
                })
                .collect();
            // The topmost hidden mounts: detaching one takes its subtree.
            let hidden_ids: HashSet<u64> = hidden.iter().map(|(m, _)| m.id).collect();
            let parents: HashMap<u64, u64> = below.iter().map(|m| (m.id, m.parent)).collect();
            let under_hidden = |m: &MountEntry| {
                let mut id = m.parent;
                while let Some(&parent) = parents.get(&id) {
                    if hidden_ids.contains(&id) {
                        return true;
                    }
                    id = parent;
                }
                false
            };
            let topmost: Vec<_> = hidden.iter().filter(|(m, _)| !under_hidden(m)).collect();
            let Some((first, _)) = topmost.first() else {
                return Ok(left_out);
            };
            if rounds == 0 {
                return Err(other(format!(
                    "{} is still mounted after every hidden submount was detached",
                    first.mount_point.display()
                )));
            }
            rounds -= 1;
            for (m, rel) in topmost {
                detach_below(tree, rel, m, &below)?;
                let path = source.join(rel);
                if !left_out.iter().any(|l| l.path == path) {
                    left_out.push(LeftOut {
                        path,
                        fstype: m.fstype.clone(),
                    });
                }
            }
        }
    }
}

/// Unmounts mount `m` (or a mount stacked on it, which goes with it anyway)
/// at `rel` beneath the clone's root, by file descriptor: no symlink is
/// followed on the way, and what is unmounted is checked to lie in the
/// clone.
fn detach_below(
    tree: &OwnedFd,
    rel: &Path,
    m: &MountEntry,
    below: &[&MountEntry],
) -> std::io::Result<()> {
    let fd = openat2(
        tree,
        rel,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let opened = mountinfo::mount_id(&fd)?;
    if opened != m.id && !below.iter().any(|b| b.id == opened) {
        return Err(other(format!(
            "{} is not the mount the table showed there (mount {} instead of {})",
            m.mount_point.display(),
            opened,
            m.id
        )));
    }
    unmount(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        UnmountFlags::DETACH,
    )?;
    Ok(())
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// A clone attached at `<staging>/<unique>`; unless moved away, dropping it
/// detaches it again. The directory is removed either way.
struct Staged {
    at: PathBuf,
    attached: bool,
}

impl Staged {
    fn attach(tree: &OwnedFd, staging: &Path) -> std::io::Result<Staged> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let at = staging.join(name);
        std::fs::create_dir(&at)?;
        let mut staged = Staged {
            at,
            attached: false,
        };
        move_mount(
            tree,
            "",
            CWD,
            &staged.at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
        staged.attached = true;
        Ok(staged)
    }

    fn moved_away(mut self) {
        self.attached = false;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.attached {
            let flags = UnmountFlags::DETACH | UnmountFlags::NOFOLLOW;
            if let Err(e) = unmount(&self.at, flags) {
                tracing::error!(at = %self.at.display(), error = %e, "cannot detach a staged bind mount");
                return;
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.at) {
            tracing::warn!(at = %self.at.display(), error = %e, "cannot remove a staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bind_mount::{bind, BindOptions};
    use crate::shared_mount::{make_export, private_dir, remove_vm_dir, staging_dir};
    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    /// Mounts made for a test, detached on drop (last first).
    #[derive(Default)]
    struct Mounts(Vec<PathBuf>);

    impl Mounts {
        fn fs(&mut self, fstype: &str, at: &Path) {
            std::fs::create_dir_all(at).unwrap();
            let none = None::<&str>;
            mount(Some(fstype), at, Some(fstype), MsFlags::empty(), none).unwrap();
            self.0.push(at.to_path_buf());
        }
    }

    impl Drop for Mounts {
        fn drop(&mut self) {
            for at in self.0.iter().rev() {
                let _ = umount2(at, MntFlags::MNT_DETACH);
            }
        }
    }

    fn mounted_below(dir: &Path) -> Vec<PathBuf> {
        let table = mountinfo::read().unwrap();
        table
            .into_iter()
            .filter(|m| m.mount_point.starts_with(dir) && m.mount_point != dir)
            .map(|m| m.mount_point)
            .collect()
    }

    /// SEC-FS-08 (hole 2): a recursive bind of a directory holding a proc
    /// mount, a sysfs and a mount in a hidden tree carries only the
    /// ordinary submount; a mount the host makes below the source later
    /// (the source is shared, as `/` is under systemd) never arrives.
    #[test]
    fn sec_fs_08_a_recursive_bind_leaves_out_kernel_and_hidden_mounts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounts need root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let src = host.path().join("src");
        let mut mounts = Mounts::default();
        std::fs::create_dir(&src).unwrap();
        let none = None::<&str>;
        mount(Some(&src), &src, none, MsFlags::MS_BIND, none).unwrap();
        mounts.0.push(src.clone());
        mount(none, &src, none, MsFlags::MS_SHARED, none).unwrap();
        std::fs::write(src.join("canary"), "plain").unwrap();
        mounts.fs("tmpfs", &src.join("ok"));
        std::fs::write(src.join("ok/file"), "submount").unwrap();
        mounts.fs("proc", &src.join("a/proc"));
        mounts.fs("sysfs", &src.join("ok/sys"));
        mounts.fs("tmpfs", &src.join("state/pod/private"));
        std::fs::write(src.join("state/pod/private/secret"), "other pod").unwrap();
        mounts.fs("tmpfs", &src.join("state/pod/private/rootfs"));
        // An ordinary mount stacked on a proc goes with it.
        mounts.fs("proc", &src.join("b"));
        mounts.fs("tmpfs", &src.join("b"));
        std::fs::write(src.join("b/over"), "over proc").unwrap();

        let vm = tempfile::tempdir().unwrap();
        make_export(vm.path()).unwrap();
        let target = private_dir(vm.path()).join("c1");
        std::fs::create_dir(&target).unwrap();
        let policy = SubmountPolicy {
            staging: staging_dir(vm.path()),
            hidden: vec![src.join("state")],
        };
        let opts = BindOptions {
            recursive: true,
            ..Default::default()
        };
        let bound = bind(&src, &target, opts, &policy);
        let late = src.join("late");
        mounts.fs("proc", &late);
        let seen = |p: &str| std::fs::read_to_string(target.join(p)).ok();
        let (canary, ok) = (seen("canary"), seen("ok/file"));
        let (proc_self, secret) = (seen("a/proc/self/status"), seen("state/pod/private/secret"));
        let stacked = target.join("b/over").exists() || target.join("b/self").exists();
        let sys = target.join("ok/sys/kernel").exists();
        let late_seen = target.join("late/self/status").exists();
        let staged = mounted_below(&policy.staging);
        let export = crate::shared_mount::export_dir(vm.path());
        let exported = std::fs::read_to_string(export.join("c1/ok/file")).ok();
        let exported_proc = export.join("c1/a/proc/self").exists();
        remove_vm_dir(vm.path()).unwrap();
        drop(mounts);

        let mut left_out = bound.unwrap().left_out;
        left_out.sort_by(|a, b| a.path.cmp(&b.path));
        let expected = [
            ("a/proc", "proc"),
            ("b", "proc"),
            ("ok/sys", "sysfs"),
            ("state/pod/private", "tmpfs"),
        ];
        let expected: Vec<LeftOut> = expected
            .iter()
            .map(|(p, t)| LeftOut {
                path: src.join(p),
                fstype: t.to_string(),
            })
            .collect();
        assert_eq!(left_out, expected);
        assert_eq!(canary.as_deref(), Some("plain"));
        assert_eq!(
            ok.as_deref(),
            Some("submount"),
            "the ordinary submount is missing"
        );
        assert_eq!(exported.as_deref(), Some("submount"), "not in the export");
        assert_eq!(proc_self, None, "a proc mount came along");
        assert!(!sys && !exported_proc, "sysfs or proc reached the export");
        assert_eq!(secret, None, "a mount in a hidden tree came along");
        assert!(
            !stacked,
            "the proc at b, or the tmpfs stacked on it, came along"
        );
        assert!(!late_seen, "a later host mount propagated into the bind");
        assert!(staged.is_empty(), "left in staging: {staged:?}");
    }
}
