//! A container's bind mounts, shared with the guest through virtio-fs.
//!
//! Each bind mount of the spec (`/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname` from CRI, volumes) is bind-mounted on the host at
//! `<vm>/private/<cid>/mounts/<n>` by file descriptor (bind_mount.rs:
//! the source canonicalised, never the host's /proc, /sys or /dev;
//! read-only there too, from birth, when the spec asks for `ro`), and the
//! spec's source becomes its path in the guest's view of the export.
//! A recursive bind (`rbind`: every hostPath) comes without the host's
//! kernel filesystems and without any mount in the host's /proc, /sys,
//! /dev, the shim's state directory or containerd's (submounts.rs); a
//! warning names what was left out. Unmounting never follows links.
//!
//! A source is a guest path only when it is exactly the guest copy that
//! volume_sync.rs made for that mount; any other source in the guest's
//! volume directory is refused, so no spec can name guest paths.

use std::path::{Path, PathBuf};

use clh_agent_protocol::{EPHEMERAL_DIR, GUEST_SHARED_DIR, GUEST_VOLUMES_DIR};
use nix::mount::{umount2, MntFlags};

use super::bind_options::{self, bind_options};
use super::error::{Error, Result};
use super::volume_sync;
use crate::bind_mount::{self, Propagation, SubmountPolicy};
use crate::shared_mount::{private_dir, staging_dir};

/// containerd's default root and state directories.
const CONTAINERD_DIRS: [&str; 2] = ["/var/lib/containerd", "/run/containerd"];

/// The directory below containerd's state directory where shim v2 bundles
/// live (`<state>/io.containerd.runtime.v2.task/<namespace>/<id>`).
const CONTAINERD_TASK_DIR: &str = "io.containerd.runtime.v2.task";

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
pub(super) fn memory_volume(
    m: &serde_json::Value,
    is_tmpfs: impl Fn(&Path) -> bool,
) -> Option<String> {
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

/// Refuses mount `m` when its source is in the guest's volume directory,
/// however spelled (`..`, `//`, `.`): only the guest copies volume_sync.rs
/// made may name guest paths, so a spec cannot make the shim skip the host
/// bind and hand the guest a path of its own choosing
/// (`/run/clh/volumes/../..` is the guest's root).
pub(super) fn refuse_guest_path(m: &serde_json::Value) -> Result<()> {
    let source = m.get("source").and_then(|s| s.as_str()).unwrap_or_default();
    let path = Path::new(source);
    let dotdot = path
        .components()
        .any(|c| c == std::path::Component::ParentDir);
    if path.starts_with(GUEST_VOLUMES_DIR)
        || (dotdot && lexically_normal(path).starts_with(GUEST_VOLUMES_DIR))
    {
        let dest = m.get("destination").and_then(|d| d.as_str()).unwrap_or("?");
        return Err(Error::InvalidArgument(format!(
            "the bind mount for {dest} has source {source:?}, in {GUEST_VOLUMES_DIR}, which is reserved for the runtime's copies of synced volumes: use a host path outside it"
        )));
    }
    Ok(())
}

/// `path` with `.` and `..` applied lexically (`/a/../b` is `/b`).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// What a recursive bind of this VM leaves out besides the host's kernel
/// trees: the shim's state directory (the parent of `vm_dir`), containerd's
/// state directory (above `bundle`) and containerd's default directories.
fn submount_policy(vm_dir: &Path, bundle: &Path) -> SubmountPolicy {
    let containerd_state = bundle
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == CONTAINERD_TASK_DIR))
        .and_then(Path::parent);
    let hidden = vm_dir
        .parent()
        .into_iter()
        .chain(containerd_state)
        .chain(CONTAINERD_DIRS.iter().map(Path::new))
        // The mount table shows canonical paths.
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .collect();
    SubmountPolicy {
        staging: staging_dir(vm_dir),
        hidden,
    }
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
/// Only the exact path [`volume_sync::guest_dir`] gives mount `n`, when
/// volume_sync.rs made that copy (`synced`), counts as a synced volume's
/// copy; any other source in `GUEST_VOLUMES_DIR` is refused.
pub(super) fn guest_source(
    m: &serde_json::Value,
    cid: &str,
    n: usize,
    synced: bool,
    is_tmpfs: impl Fn(&Path) -> bool,
) -> Result<GuestSource> {
    let source = m.get("source").and_then(|s| s.as_str()).unwrap_or_default();
    if !is_bind(m) || (synced && source == volume_sync::guest_dir(cid, n)) {
        return Ok(GuestSource::Unchanged);
    }
    refuse_guest_path(m)?;
    Ok(match memory_volume(m, is_tmpfs) {
        Some(name) => GuestSource::Memory(name),
        None => GuestSource::Shared,
    })
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
    /// its source; `guest_sources` are the guest copies of synced volumes
    /// already in the spec, `bundle` the container's bundle. On error the
    /// mounts already made are undone.
    pub fn share(
        spec: &mut serde_json::Value,
        vm_dir: &Path,
        cid: &str,
        bundle: &Path,
        guest_sources: &[String],
    ) -> Result<Binds> {
        let mut binds = Binds::default();
        let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
            return Ok(binds);
        };
        let host_dir = private_dir(vm_dir).join(cid).join("mounts");
        let policy = submount_policy(vm_dir, bundle);
        let mut made_dir = false;
        // Guest mounts to insert after mount n (bind_options.rs).
        let mut extra: Vec<(usize, Vec<serde_json::Value>)> = Vec::new();
        for (n, m) in mounts.iter_mut().enumerate() {
            let synced = guest_sources
                .iter()
                .any(|g| *g == volume_sync::guest_dir(cid, n));
            let guest = match guest_source(m, cid, n, synced, host_is_tmpfs) {
                Ok(guest) => guest,
                Err(e) => {
                    binds.undo();
                    return Err(e);
                }
            };
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
            let submounts = match binds.share_one(m, &target, &policy) {
                Ok(submounts) => submounts,
                Err(e) => {
                    binds.undo();
                    return Err(e);
                }
            };
            if !submounts.is_empty() {
                extra.push((n, bind_options::submount_entries(m, &path, &submounts)));
            }
            m["source"] = serde_json::Value::String(path);
        }
        // Last first, so that the earlier indices still hold.
        for (n, entries) in extra.into_iter().rev() {
            mounts.splice(n + 1..n + 1, entries);
        }
        bind_options::guest_propagation(spec);
        Ok(binds)
    }

    fn undo(&mut self) {
        if let Err(u) = self.unmount() {
            tracing::error!(error = %u, "undoing bind mounts after a failure");
        }
    }

    /// Shares mount `m` at `target`; returns the direct submounts the
    /// guest must mount again read-write (bind_options.rs).
    fn share_one(
        &mut self,
        m: &serde_json::Value,
        target: &Path,
        policy: &SubmountPolicy,
    ) -> Result<Vec<PathBuf>> {
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
        // Read-only on the host side too: guest root cannot write it.
        let opts = bind_options(m)?;
        if opts.propagation == Propagation::Slave {
            bind_options::check_slave_source(m, source, &policy.hidden)?;
        }
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
        let bound = bind_mount::bind(source, target, opts, policy).map_err(|e| {
            let _ = remove_mount_point(target);
            Error::InvalidArgument(format!("{e} (for {dest})"))
        })?;
        let left_out = bound.left_out;
        self.targets.push(target.to_path_buf());
        if !left_out.is_empty() {
            let left_out: Vec<String> = left_out.iter().map(ToString::to_string).collect();
            tracing::warn!(
                source = %source.display(),
                destination = dest,
                left_out = %left_out.join(", "),
                "the bind mount comes without the host's kernel and runtime mounts below it"
            );
        }
        Ok(bound.submounts)
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

    /// A VM directory laid out as the shim does (as root: mounted),
    /// removed on drop.
    struct TestVm(tempfile::TempDir);

    impl TestVm {
        fn new() -> TestVm {
            let dir = tempfile::tempdir().unwrap();
            crate::shared_mount::make_export(dir.path()).unwrap();
            TestVm(dir)
        }

        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for TestVm {
        fn drop(&mut self) {
            let _ = crate::shared_mount::remove_vm_dir(self.0.path());
        }
    }

    /// `Binds::share` for container c1 of `vm`, with no synced volume.
    fn share(spec: &mut serde_json::Value, vm: &Path) -> Result<Binds> {
        Binds::share(spec, vm, "c1", Path::new("/nonexistent/bundle"), &[])
    }

    #[test]
    fn binds_are_shared_read_only_where_asked_and_undone() {
        if !root() {
            clh_test_skip::skip("bind mounts need root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let vm = TestVm::new();
        let file = host.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 pod\n").unwrap();
        let dir = host.path().join("vol");
        std::fs::create_dir(&dir).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            {"destination": "/data", "source": dir, "options": ["rbind", "rw"]},
        ]});
        let mut binds = share(&mut spec, vm.path()).unwrap();
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
            clh_test_skip::skip("tmpfs needs root");
            return;
        }
        let pod = tempfile::tempdir().unwrap();
        let plugin = pod.path().join("kubernetes.io~empty-dir");
        let (cache, disk) = (plugin.join("cache"), plugin.join("disk"));
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&disk).unwrap();
        let tmpfs = nix::mount::MsFlags::empty();
        nix::mount::mount(Some("tmpfs"), &cache, Some("tmpfs"), tmpfs, None::<&str>).unwrap();
        let vm = TestVm::new();
        let mut spec = json!({"mounts": [
            {"destination": "/cache", "type": "bind", "source": cache, "options": ["rbind"]},
            {"destination": "/disk", "type": "bind", "source": disk, "options": ["rbind"]},
        ]});
        let shared = share(&mut spec, vm.path());
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
            guest_source(&bind("/run/clh/volumes/c1/2"), "c1", 2, true, no_tmpfs).unwrap(),
            GuestSource::Unchanged
        );
        for (hostile, synced) in [
            ("/run/clh/volumes/c1/2", false),
            ("/run/clh/volumes/../..", true),
            ("/run/clh/volumes/c1/2/../../../etc", true),
            ("/run/clh/volumes/c2/2", true),
            ("/run/clh/volumes/c1/1", true),
            ("/run/clh/volumes", true),
        ] {
            let refused = guest_source(&bind(hostile), "c1", 2, synced, no_tmpfs);
            assert!(
                matches!(refused, Err(Error::InvalidArgument(_))),
                "{hostile}: {refused:?}"
            );
        }
        let proc = json!({"destination": "/proc", "type": "proc", "source": "/run/clh/volumes/.."});
        assert_eq!(
            guest_source(&proc, "c1", 0, false, no_tmpfs).unwrap(),
            GuestSource::Unchanged
        );
        let memory = bind("/pod/volumes/kubernetes.io~empty-dir/cache");
        assert_eq!(
            guest_source(&memory, "c1", 0, false, |_: &Path| true).unwrap(),
            GuestSource::Memory("cache".into())
        );
    }

    #[test]
    fn a_relative_or_missing_source_is_an_invalid_argument() {
        let vm = TestVm::new();
        for source in ["relative/path", "/nonexistent/clh-test"] {
            let mut spec =
                json!({"mounts": [{"destination": "/x", "type": "bind", "source": source}]});
            let err = share(&mut spec, vm.path()).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(source), "{err}");
        }
    }
}

#[cfg(test)]
mod guest_source_tests {
    use super::*;
    use serde_json::json;

    /// SEC-FS-08 (hole 7): only the exact guest copy volume_sync made skips
    /// the host bind; other spellings of the guest's volume directory are
    /// refused, `..` included.
    #[test]
    fn only_the_synced_copy_is_a_guest_source() {
        let vm = tempfile::tempdir().unwrap();
        let copy = format!("{GUEST_VOLUMES_DIR}/c1/0");
        let mut spec = json!({"mounts": [
            {"destination": "/etc/config", "type": "bind", "source": copy, "options": ["rbind", "ro"]},
        ]});
        let bundle = Path::new("/nonexistent/bundle");
        let binds = Binds::share(
            &mut spec,
            vm.path(),
            "c1",
            bundle,
            std::slice::from_ref(&copy),
        )
        .unwrap();
        assert!(binds.targets.is_empty());
        assert_eq!(spec["mounts"][0]["source"], copy.as_str());
        for source in [
            format!("{GUEST_VOLUMES_DIR}/../../etc"),
            format!("{GUEST_VOLUMES_DIR}/c1/0/../../c2/0"),
            format!("{GUEST_VOLUMES_DIR}/c1/0"),
            "/run//clh/./volumes/x".to_string(),
            "/tmp/../run/clh/volumes/x".to_string(),
        ] {
            let mut spec = json!({"mounts": [
                {"destination": "/x", "type": "bind", "source": source, "options": ["rbind"]},
            ]});
            let err = Binds::share(&mut spec, vm.path(), "c1", bundle, &[]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{source}: {err}");
            assert!(err.to_string().contains("reserved"), "{source}: {err}");
            assert_eq!(spec["mounts"][0]["source"], source.as_str());
        }
    }

    #[test]
    fn the_hidden_trees_are_the_state_dirs_of_the_shim_and_containerd() {
        let bundle = Path::new("/nonexistent/ctd/io.containerd.runtime.v2.task/k8s.io/abc");
        let policy = submount_policy(Path::new("/nonexistent/clh/pod"), bundle);
        for dir in [
            "/nonexistent/clh",
            "/nonexistent/ctd",
            "/var/lib/containerd",
        ] {
            assert!(
                policy
                    .hidden
                    .iter()
                    .any(|h| h.ends_with(dir.trim_start_matches('/')) || h == Path::new(dir)),
                "{dir} not hidden: {policy:?}"
            );
        }
        assert_eq!(policy.staging, Path::new("/nonexistent/clh/pod/staging"));
    }
}
