//! What a crashed shim leaves, and how `delete` finds and ends it:
//! `state.json` records the pids and command lines of a VM's processes
//! when it starts, so that a later `delete` kills those processes (and
//! only them: a recycled pid has another command line) and removes the
//! VM directory without crossing a mount.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use clh_network::PodNetwork;

use super::{validate_id, StartStep};
use crate::shared_mount::{private_dir, remove_container_dir, remove_vm_dir};

/// What `state.json` records: enough to kill what we started, and only it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedState {
    pub(super) processes: Vec<PersistedProcess>,
    /// The pod's interfaces wired to taps, to unwire.
    #[serde(default)]
    pub(super) network: Option<PodNetwork>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedProcess {
    pub(super) pid: u32,
    /// `/proc/<pid>/cmdline` at start, NUL-separated: a recycled pid has
    /// another command line.
    pub(super) cmdline: Vec<u8>,
}

/// Writes `dir/state.json` (0600) atomically.
pub(super) fn persist_state(
    dir: &Path,
    pids: &[u32],
    network: Option<&PodNetwork>,
) -> Result<(), StartStep> {
    let state = PersistedState {
        network: network.cloned(),
        processes: pids
            .iter()
            .map(|&pid| PersistedProcess {
                pid,
                cmdline: std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            })
            .collect(),
    };
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let bytes = serde_json::to_vec(&state).map_err(std::io::Error::from);
    bytes
        .and_then(|bytes| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut file| file.write_all(&bytes))
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StartStep::Io {
            action: "write",
            path,
            source,
        })
}

/// How long a `delete` waits for another's cleanup: containerd gives the
/// whole `delete` 5 s.
const CLEANUP_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// One cleanup at a time under a state root. After a pod's shim dies,
/// containerd runs `delete` for the sandbox and for each container at
/// once: the sandbox's removes the VM directory while a container's
/// unmounts and removes its part of it, and the two walks would trip over
/// each other (REL-SHIM-01). An exclusive flock on the root serialises
/// them; each takes milliseconds. Held until dropped.
struct CleanupLock {
    /// The flock goes with the file.
    _held: Option<std::fs::File>,
}

impl CleanupLock {
    /// Waits up to [`CLEANUP_LOCK_WAIT`]; past it (or when the root cannot
    /// be opened) the cleanup goes on unlocked, which the walks tolerate.
    fn take(root: &Path) -> Self {
        let Ok(dir) = std::fs::File::open(root) else {
            return CleanupLock { _held: None };
        };
        match flock_exclusive_within(&dir, CLEANUP_LOCK_WAIT) {
            Ok(()) => CleanupLock { _held: Some(dir) },
            Err(e) => {
                tracing::warn!(root = %root.display(), error = %e, "cleaning up without the state root's lock");
                CleanupLock { _held: None }
            }
        }
    }
}

/// Takes an exclusive flock on `file`, waiting up to `wait` for another
/// holder: a blocking flock has no timeout, a short poll does. Past `wait`
/// the error is `WOULDBLOCK`.
pub(super) fn flock_exclusive_within(
    file: &std::fs::File,
    wait: std::time::Duration,
) -> rustix::io::Result<()> {
    use rustix::fs::{flock, FlockOperation};
    let deadline = std::time::Instant::now() + wait;
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            taken => return taken,
        }
    }
}

/// After a shim crash: SIGKILLs the processes recorded in
/// `root/<id>/state.json` that are still the ones we started (same command
/// line), unwires the pod's network, then removes the directory. A missing
/// directory is not an error.
pub fn cleanup_leftovers(root: &Path, id: &str) -> anyhow::Result<()> {
    validate_id(id)?;
    let _lock = CleanupLock::take(root);
    let dir = root.join(id);
    if !dir.exists() {
        return Ok(());
    }
    let state: Option<PersistedState> = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let (processes, network) = state.map_or((Vec::new(), None), |s| (s.processes, s.network));
    for process in processes {
        let current = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
        if process.cmdline.is_empty() || current != process.cmdline {
            continue;
        }
        let Ok(pid) = i32::try_from(process.pid) else {
            continue;
        };
        tracing::info!(pid, "killing a leftover VM process");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    if let Some(network) = network {
        clh_network::unwire(&network).context("unwiring the pod's network")?;
    }
    remove_vm_dir(&dir)
}

/// After a shim crash, for one of a pod's containers: unmounts its rootfs
/// and bind mounts under `root/<sandbox_id>/private/<id>/` (not following
/// links) and removes the directory, without touching the rest of the VM.
pub fn cleanup_container_leftovers(root: &Path, sandbox_id: &str, id: &str) -> anyhow::Result<()> {
    use nix::mount::{umount2, MntFlags};
    validate_id(sandbox_id)?;
    validate_id(id).context("invalid container id")?;
    let _lock = CleanupLock::take(root);
    let dir = private_dir(&root.join(sandbox_id)).join(id);
    let mut targets = vec![dir.join("rootfs")];
    if let Ok(entries) = std::fs::read_dir(dir.join("mounts")) {
        targets.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    let flags = MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH;
    for target in &targets {
        while umount2(target, flags).is_ok() {}
    }
    for target in targets.iter().skip(1) {
        let _ = std::fs::remove_file(target).or_else(|_| std::fs::remove_dir(target));
    }
    remove_container_dir(&root.join(sandbox_id), id)
}
