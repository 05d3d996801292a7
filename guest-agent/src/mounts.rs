//! The guest's base filesystems, mounted from a static table.
//!
//! The kernel starts us with only the initramfs at `/`. Everything else a
//! Linux userspace expects is mounted here, in table order: parents before
//! the mounts that live inside them (`/dev` before `/dev/pts`, `/sys` before
//! `/sys/fs/cgroup`). The syscalls sit behind [`Mounter`] so the planning
//! (order, EBUSY tolerance, error messages) is unit-tested without root.

use nix::errno::Errno;
use nix::mount::MsFlags;
use std::path::{Path, PathBuf};

/// One row of the mount table.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// What PID 1 mounts, in order. The guest is ours alone, so cgroups are the
/// v2 unified hierarchy only (no v1 controllers to stay compatible with).
pub const BASE_MOUNTS: &[MountSpec] = &[
    spec("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
    spec("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
    // devtmpfs: the kernel creates device nodes itself, so no udev is needed.
    spec(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    spec(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    spec("shm", "/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777"),
    spec("tmpfs", "/run", "tmpfs", NOSUID_NODEV, "mode=0755"),
    spec("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, "mode=1777"),
    spec(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        "nsdelegate",
    ),
];

const fn spec(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
) -> MountSpec {
    MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
    }
}

/// The syscalls mounting needs; the seam for tests.
pub trait Mounter {
    fn create_dir_all(&mut self, path: &Path) -> std::io::Result<()>;
    fn mount(&mut self, spec: &MountSpec) -> Result<(), Errno>;
}

/// The real thing: `mkdir -p` and mount(2).
pub struct SysMounter;

impl Mounter for SysMounter {
    fn create_dir_all(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount(&mut self, spec: &MountSpec) -> Result<(), Errno> {
        let data = (!spec.data.is_empty()).then_some(spec.data);
        nix::mount::mount(
            Some(spec.source),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            data,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
}

/// What happened to one table row, for the log (logging may not be set up
/// yet while we mount, since its configuration comes from /proc/cmdline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Mounted(&'static str),
    /// EBUSY: something (the kernel, or an earlier run) mounted it already.
    AlreadyMounted(&'static str),
}

/// Mounts every row of `table` in order; stops at the first failure, since
/// later rows may live inside the one that failed.
pub fn mount_all(m: &mut dyn Mounter, table: &[MountSpec]) -> Result<Vec<Outcome>, MountError> {
    let mut outcomes = Vec::with_capacity(table.len());
    for spec in table {
        let target = Path::new(spec.target);
        m.create_dir_all(target)
            .map_err(|source| MountError::MountPoint {
                path: target.to_owned(),
                source,
            })?;
        match m.mount(spec) {
            Ok(()) => outcomes.push(Outcome::Mounted(spec.target)),
            Err(Errno::EBUSY) => outcomes.push(Outcome::AlreadyMounted(spec.target)),
            Err(source) => {
                return Err(MountError::Mount {
                    fstype: spec.fstype,
                    target: spec.target,
                    source,
                })
            }
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeMounter {
        log: Vec<String>,
        busy: Vec<&'static str>,
        fail: Option<&'static str>,
    }

    impl Mounter for FakeMounter {
        fn create_dir_all(&mut self, path: &Path) -> std::io::Result<()> {
            self.log.push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn mount(&mut self, spec: &MountSpec) -> Result<(), Errno> {
            self.log.push(format!("mount {}", spec.target));
            if self.fail == Some(spec.target) {
                return Err(Errno::ENODEV);
            }
            if self.busy.contains(&spec.target) {
                return Err(Errno::EBUSY);
            }
            Ok(())
        }
    }

    #[test]
    fn parents_come_before_children() {
        for (i, child) in BASE_MOUNTS.iter().enumerate() {
            for parent in &BASE_MOUNTS[i + 1..] {
                let prefix = format!("{}/", parent.target);
                assert!(
                    !child.target.starts_with(&prefix),
                    "{} must be mounted before {}",
                    parent.target,
                    child.target
                );
            }
        }
    }

    #[test]
    fn mounts_everything_and_tolerates_ebusy() {
        let mut m = FakeMounter {
            busy: vec!["/dev"],
            ..Default::default()
        };
        let out = mount_all(&mut m, BASE_MOUNTS).unwrap();
        assert_eq!(out.len(), BASE_MOUNTS.len());
        assert_eq!(out[2], Outcome::AlreadyMounted("/dev"));
        assert_eq!(out[0], Outcome::Mounted("/proc"));
        assert_eq!(m.log[0], "mkdir /proc");
        assert_eq!(m.log[1], "mount /proc");
    }

    #[test]
    fn stops_at_first_failure_and_names_the_target() {
        let mut m = FakeMounter {
            fail: Some("/dev"),
            ..Default::default()
        };
        let err = mount_all(&mut m, BASE_MOUNTS).unwrap_err();
        assert_eq!(err.to_string(), "cannot mount devtmpfs on /dev");
        assert_eq!(m.log.last().map(String::as_str), Some("mount /dev"));
    }
}
