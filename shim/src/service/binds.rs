//! A container's bind mounts, shared with the guest through virtio-fs.
//!
//! Each bind mount of the spec (`/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname` from CRI, volumes) is bind-mounted on the host at
//! `<vm>/private/<cid>/mounts/<n>` by file descriptor (bind_mount.rs:
//! the source canonicalised, never the host's /proc, /sys or /dev;
//! read-only there too, from birth, when the spec asks for `ro`), and the
//! spec's source becomes its path in the guest's view of the export.
//! Unmounting never follows links.

use std::path::{Path, PathBuf};

use clh_agent_protocol::{EPHEMERAL_DIR, GUEST_SHARED_DIR};
use nix::mount::{umount2, MntFlags};

use super::error::{Error, Result};
use super::volume_sync;
use crate::bind_mount::{self, BindOptions};
use crate::shared_mount::private_dir;

/// The host-side mounts made for one container, undone by [`Binds::unmount`].
#[derive(Debug, Default)]
pub struct Binds {
    targets: Vec<PathBuf>,
}

pub(super) fn is_bind(m: &serde_json::Value) -> bool {
    m.get("type").and_then(|t| t.as_str()) == Some("bind")
        || has_option(m, "bind")
        || has_option(m, "rbind")
}

/// The kubelet's directory for `emptyDir` volumes.
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// The volume name of an `emptyDir` with `medium: Memory`: the kubelet
/// makes it a tmpfs at `.../volumes/kubernetes.io~empty-dir/<name>`. In a
/// VM it becomes guest memory instead (the pod's memory limit covers it
/// there, as the kubelet's tmpfs is charged to the pod on a node).
/// `is_tmpfs` tells whether a host path is a tmpfs ([`host_is_tmpfs`]).
fn memory_volume(m: &serde_json::Value, is_tmpfs: impl Fn(&Path) -> bool) -> Option<String> {
    let source = Path::new(m.get("source")?.as_str()?);
    let parent = source.parent()?;
    if parent.file_name()? != EMPTY_DIR_PLUGIN || !is_tmpfs(source) {
        return None;
    }
    let name = source.file_name()?.to_str()?;
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (plain && !name.starts_with('.')).then(|| name.to_string())
}

/// Whether the host path `path` is a tmpfs.
pub(super) fn host_is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Where the source of mount `n` of container `cid` is in the guest.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum GuestSource {
    /// Not a bind mount, or the guest copy of a synced volume: as it is.
    Unchanged,
    /// A memory `emptyDir`: `<EPHEMERAL_DIR>/<name>`, in guest RAM.
    Memory(String),
    /// A host path: bind-mounted into the shared directory, seen in the
    /// guest at `<GUEST_SHARED_DIR>/<cid>/mounts/<n>`.
    Shared,
}

/// What becomes of mount `n` of container `cid` (see [`GuestSource`]).
/// Only the exact path [`volume_sync::guest_dir`] gives mount `n` counts
/// as a synced volume's copy: any other source, even one under
/// `GUEST_VOLUMES_DIR` (`/run/clh/volumes/../..` is the guest's root), is a
/// host path like every other.
pub(super) fn guest_source(
    m: &serde_json::Value,
    cid: &str,
    n: usize,
    is_tmpfs: impl Fn(&Path) -> bool,
) -> GuestSource {
    let source = m.get("source").and_then(|s| s.as_str()).unwrap_or_default();
    if !is_bind(m) || source == volume_sync::guest_dir(cid, n) {
        return GuestSource::Unchanged;
    }
    match memory_volume(m, is_tmpfs) {
        Some(name) => GuestSource::Memory(name),
        None => GuestSource::Shared,
    }
}

impl GuestSource {
    /// The new source of mount `n` of container `cid`; `None`: unchanged.
    pub(super) fn path(&self, cid: &str, n: usize) -> Option<String> {
        match self {
            Self::Unchanged => None,
            Self::Memory(name) => Some(format!("{EPHEMERAL_DIR}/{name}")),
            Self::Shared => Some(format!("{GUEST_SHARED_DIR}/{cid}/mounts/{n}")),
        }
    }
}

fn has_option(m: &serde_json::Value, opt: &str) -> bool {
    m.get("options")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(opt)))
}

impl Binds {
    /// Shares every bind mount of `spec` (see the module doc) and rewrites
    /// its source. On error the mounts already made are undone.
    pub fn share(spec: &mut serde_json::Value, vm_dir: &Path, cid: &str) -> Result<Binds> {
        let mut binds = Binds::default();
        let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
            return Ok(binds);
        };
        let host_dir = private_dir(vm_dir).join(cid).join("mounts");
        let mut made_dir = false;
        for (n, m) in mounts.iter_mut().enumerate() {
            let guest = guest_source(m, cid, n, host_is_tmpfs);
            let Some(path) = guest.path(cid, n) else {
                continue;
            };
            if let GuestSource::Memory(_) = guest {
                // In guest RAM, shared by the pod's containers; nothing of
                // it goes through the host.
                m["source"] = serde_json::Value::String(path);
                continue;
            }
            if !made_dir {
                std::fs::create_dir_all(&host_dir).map_err(|e| {
                    Error::Internal(anyhow::anyhow!("cannot create {}: {e}", host_dir.display()))
                })?;
                made_dir = true;
            }
            let target = host_dir.join(n.to_string());
            if let Err(e) = binds.share_one(m, &target) {
                if let Err(u) = binds.unmount() {
                    tracing::error!(error = %u, "undoing bind mounts after a failure");
                }
                return Err(e);
            }
            m["source"] = serde_json::Value::String(path);
        }
        Ok(binds)
    }

    fn share_one(&mut self, m: &serde_json::Value, target: &Path) -> Result<()> {
        let dest = m.get("destination").and_then(|d| d.as_str()).unwrap_or("?");
        let source = m.get("source").and_then(|s| s.as_str()).unwrap_or("");
        let source = Path::new(source);
        if !source.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "the bind mount for {dest} has source {source:?}: it must be an absolute host path"
            )));
        }
        let source = &bind_mount::resolve(source)
            .map_err(|e| Error::InvalidArgument(format!("{e} (for {dest})")))?;
        let meta = std::fs::metadata(source).map_err(|e| {
            Error::InvalidArgument(format!(
                "the bind mount source {} for {dest} cannot be used: {e}",
                source.display()
            ))
        })?;
        // create_new: never reuse (or follow) something already there.
        let made = if meta.is_dir() {
            std::fs::create_dir(target)
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map(drop)
        };
        made.map_err(|e| {
            Error::Internal(anyhow::anyhow!(
                "cannot create the mount point {}: {e}",
                target.display()
            ))
        })?;
        let opts = BindOptions {
            recursive: has_option(m, "rbind"),
            // Read-only on the host side too: guest root cannot write it.
            readonly: has_option(m, "ro"),
        };
        bind_mount::bind(source, target, opts).map_err(|e| {
            let _ = remove_mount_point(target);
            Error::InvalidArgument(format!("{e} (for {dest})"))
        })?;
        self.targets.push(target.to_path_buf());
        Ok(())
    }

    /// Unmounts (no following links, detached: virtiofsd may hold files
    /// open) and removes the mount points. Removal is not recursive, so a
    /// mount that failed to go away is never emptied.
    pub fn unmount(&mut self) -> Result<()> {
        let mut first_error = None;
        for target in self.targets.drain(..).rev() {
            let flags = MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH;
            let gone = loop {
                match umount2(&target, flags) {
                    Ok(()) => continue,
                    Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            match gone {
                Ok(()) => {
                    if let Err(e) = remove_mount_point(&target) {
                        tracing::warn!(target = %target.display(), error = %e, "removing a mount point");
                    }
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        Error::Internal(anyhow::anyhow!("cannot unmount {}: {e}", target.display()))
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn remove_mount_point(target: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn binds_are_shared_read_only_where_asked_and_undone() {
        if !root() {
            eprintln!("SKIPPED: bind mounts need root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let vm = tempfile::tempdir().unwrap();
        let file = host.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 pod\n").unwrap();
        let dir = host.path().join("vol");
        std::fs::create_dir(&dir).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            {"destination": "/data", "source": dir, "options": ["rbind", "rw"]},
        ]});
        let mut binds = Binds::share(&mut spec, vm.path(), "c1").unwrap();
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/clh/shared/c1/mounts/1");
        assert_eq!(spec["mounts"][2]["source"], "/run/clh/shared/c1/mounts/2");
        let shared = vm.path().join("private/c1/mounts");
        assert_eq!(
            std::fs::read_to_string(shared.join("1")).unwrap(),
            "127.0.0.1 pod\n"
        );
        let write = std::fs::write(shared.join("1"), "x");
        assert!(write.is_err(), "a read-only bind was writable on the host");
        std::fs::write(shared.join("2/new"), "y").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("new")).unwrap(), "y");
        binds.unmount().unwrap();
        assert!(!shared.join("1").exists() && !shared.join("2").exists());
        assert!(dir.join("new").exists(), "unmounting touched the source");
    }

    #[test]
    fn a_memory_empty_dir_becomes_guest_memory() {
        if !root() {
            eprintln!("SKIPPED: tmpfs needs root");
            return;
        }
        let pod = tempfile::tempdir().unwrap();
        let plugin = pod.path().join("kubernetes.io~empty-dir");
        let (cache, disk) = (plugin.join("cache"), plugin.join("disk"));
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&disk).unwrap();
        let tmpfs = nix::mount::MsFlags::empty();
        nix::mount::mount(Some("tmpfs"), &cache, Some("tmpfs"), tmpfs, None::<&str>).unwrap();
        let vm = tempfile::tempdir().unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/cache", "type": "bind", "source": cache, "options": ["rbind"]},
            {"destination": "/disk", "type": "bind", "source": disk, "options": ["rbind"]},
        ]});
        let shared = Binds::share(&mut spec, vm.path(), "c1");
        nix::mount::umount2(&cache, MntFlags::MNT_DETACH).unwrap();
        let mut binds = shared.unwrap();
        assert_eq!(spec["mounts"][0]["source"], "/run/clh/ephemeral/cache");
        assert_eq!(spec["mounts"][1]["source"], "/run/clh/shared/c1/mounts/1");
        binds.unmount().unwrap();
    }

    /// A bind source anywhere under /run/clh/volumes used to reach the
    /// guest as it was, so `/run/clh/volumes/../..` bind-mounted the
    /// guest's root (every pod container's rootfs and synced Secrets) into
    /// the container (the `oci_spec_to_guest` fuzz target's invariant).
    #[test]
    fn only_a_synced_volumes_own_copy_is_a_guest_source() {
        let bind = |source: &str| json!({"destination": "/x", "type": "bind", "source": source});
        let no_tmpfs = |_: &Path| false;
        assert_eq!(
            guest_source(&bind("/run/clh/volumes/c1/2"), "c1", 2, no_tmpfs),
            GuestSource::Unchanged
        );
        for hostile in [
            "/run/clh/volumes/../..",
            "/run/clh/volumes/c1/2/../../../etc",
            "/run/clh/volumes/c2/2",
            "/run/clh/volumes/c1/1",
            "/run/clh/volumes",
        ] {
            assert_eq!(
                guest_source(&bind(hostile), "c1", 2, no_tmpfs),
                GuestSource::Shared,
                "{hostile}"
            );
        }
        let proc = json!({"destination": "/proc", "type": "proc", "source": "/run/clh/volumes/.."});
        assert_eq!(
            guest_source(&proc, "c1", 0, no_tmpfs),
            GuestSource::Unchanged
        );
        let memory = bind("/pod/volumes/kubernetes.io~empty-dir/cache");
        assert_eq!(
            guest_source(&memory, "c1", 0, |_: &Path| true),
            GuestSource::Memory("cache".into())
        );
    }

    #[test]
    fn a_relative_or_missing_source_is_an_invalid_argument() {
        let vm = tempfile::tempdir().unwrap();
        for source in ["relative/path", "/nonexistent/clh-test"] {
            let mut spec =
                json!({"mounts": [{"destination": "/x", "type": "bind", "source": source}]});
            let err = Binds::share(&mut spec, vm.path(), "c1").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(source), "{err}");
        }
    }
}
