//! Synced volumes: guest-side copies of the ConfigMap, Secret, projected
//! and downward-API volumes the shim pushes with SyncVolume
//! (docs/design/0003-volume-sync.md). Each lives in guest tmpfs at
//! `<base>/<container_id>/<volume>`, written as the kubelet's atomic writer
//! writes it (see `writer.rs`), so updates are atomic for readers in the
//! container and fire their inotify watches.

mod fsat;
mod path;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clh_agent_protocol::SyncVolumeRequest;
use tracing::{debug, warn};

use crate::containers::validate_id;
use fsat::Attrs;
use writer::Staging;

/// What went wrong, by the ttrpc code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum VolError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl VolError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }

    fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{what}: {e}"))
    }
}

/// One volume's state between calls.
#[derive(Debug, Default)]
struct Volume {
    committed: u64,
    /// The highest generation that may no longer receive calls (committed,
    /// failed or abandoned for a newer one).
    closed: u64,
    staging: Option<Staging>,
}

type Key = (String, u32);

/// Every synced volume of the guest. Cheap to clone.
#[derive(Clone)]
pub struct Volumes {
    base: PathBuf,
    /// One lock per volume: calls for one volume are applied in turn,
    /// calls for different volumes in parallel.
    volumes: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Volume>>>>>,
}

impl Volumes {
    /// Volumes kept under `base` (GUEST_VOLUMES_DIR in the guest).
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Volumes {
            base: base.into(),
            volumes: Arc::default(),
        }
    }

    fn dir(&self, cid: &str, volume: u32) -> PathBuf {
        self.base.join(cid).join(volume.to_string())
    }

    fn volume(&self, key: &Key) -> Arc<tokio::sync::Mutex<Volume>> {
        let mut all = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(key.clone()).or_default().clone()
    }

    /// Applies one SyncVolume call; returns the volume's guest path and its
    /// committed generation.
    pub async fn sync(&self, req: SyncVolumeRequest) -> Result<(PathBuf, u64), VolError> {
        validate_id("container id", &req.container_id)
            .map_err(|e| VolError::InvalidArgument(e.to_string()))?;
        let key = (req.container_id.clone(), req.volume);
        let dir = self.dir(&req.container_id, req.volume);
        let volume = self.volume(&key);
        let mut state = volume.lock().await;
        let mut taken = std::mem::take(&mut *state);
        let base = self.base.clone();
        let work_dir = dir.clone();
        // Blocking file I/O, off the runtime's workers.
        let (back, result) = tokio::task::spawn_blocking(move || {
            let r = apply(&mut taken, &base, &work_dir, &req);
            (taken, r)
        })
        .await
        .map_err(|e| VolError::internal("the volume writer task", e))?;
        *state = back;
        result.map(|committed| (dir, committed))
    }

    /// Removes a volume's guest copy; absent is fine.
    pub async fn remove(&self, cid: &str, volume: u32) -> Result<(), VolError> {
        validate_id("container id", cid).map_err(|e| VolError::InvalidArgument(e.to_string()))?;
        let key = (cid.to_owned(), volume);
        let lock = self.volume(&key);
        let _held = lock.lock().await;
        let cid_dir = self.base.join(cid);
        tokio::task::spawn_blocking(move || remove_dir(&cid_dir, volume))
            .await
            .map_err(|e| VolError::internal("the volume remover task", e))??;
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        Ok(())
    }
}

fn apply(
    v: &mut Volume,
    base: &Path,
    dir: &Path,
    req: &SyncVolumeRequest,
) -> Result<u64, VolError> {
    let g = req.generation;
    let name = format!("volume {} of container {}", req.volume, req.container_id);
    let current = v.staging.as_ref().map(|s| s.generation);
    if g == 0 || g <= v.closed || current.is_some_and(|c| g < c) {
        return Err(VolError::FailedPrecondition(format!(
            "generation {g} of {name} is stale (committed: {}, in progress: {current:?}); \
             start a new generation",
            v.committed
        )));
    }
    let vol = open_volume_dir(base, dir)?;
    let result = apply_to(v, vol.as_fd(), g, req);
    if result.is_err() {
        // A generation that failed half-way must never be committed.
        v.closed = v.closed.max(g);
        if let Some(s) = v.staging.take() {
            if let Err(e) = s.discard(vol.as_fd()) {
                warn!("{name}: {e}");
            }
        }
    }
    result
}

fn apply_to(
    v: &mut Volume,
    vol: std::os::fd::BorrowedFd<'_>,
    g: u64,
    req: &SyncVolumeRequest,
) -> Result<u64, VolError> {
    if v.staging.as_ref().is_none_or(|s| s.generation != g) {
        if let Some(old) = v.staging.take() {
            debug!(
                old = old.generation,
                new = g,
                "abandoning an unfinished generation"
            );
            v.closed = v.closed.max(old.generation);
            old.discard(vol)?;
        }
        v.staging = Some(Staging::create(vol, g, now_unix())?);
    }
    let staging = v
        .staging
        .as_mut()
        .ok_or_else(|| VolError::Internal("no staging directory".into()))?;
    for e in &req.entries {
        staging.apply(vol, e)?;
    }
    if req.commit {
        let root = Attrs {
            mode: req.root_mode,
            uid: req.root_uid,
            gid: req.root_gid,
        };
        root.apply(vol)
            .map_err(|e| VolError::internal("setting the volume's mode and owner", e))?;
        if let Some(s) = v.staging.take() {
            s.swap_in(vol)?;
        }
        v.committed = g;
        v.closed = g;
    }
    Ok(v.committed)
}

/// Opens (creating it if needed) the volume's directory. The path down to
/// it is the agent's own (containers only ever see the inside of `dir`).
fn open_volume_dir(base: &Path, dir: &Path) -> Result<OwnedFd, VolError> {
    use std::os::unix::fs::DirBuilderExt;
    let internal = |e: std::io::Error| VolError::internal(format!("creating {}", dir.display()), e);
    // Only root needs to pass through: the container mounts `dir` itself.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
        .map_err(internal)?;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(parent)
            .or_else(exists_ok)
            .map_err(internal)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .or_else(exists_ok)
        .map_err(internal)?;
    fsat::open_dir(dir).map_err(|e| VolError::internal(format!("opening {}", dir.display()), e))
}

fn exists_ok(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Ok(())
    } else {
        Err(e)
    }
}

/// Removes `<cid_dir>/<volume>`, then `cid_dir` once it is empty.
fn remove_dir(cid_dir: &Path, volume: u32) -> Result<(), VolError> {
    let what = || format!("removing {}/{volume}", cid_dir.display());
    let parent = match fsat::open_dir(cid_dir) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(VolError::internal(what(), e)),
    };
    fsat::remove_tree_at(parent.as_fd(), std::ffi::OsStr::new(&volume.to_string()))
        .map_err(|e| VolError::internal(what(), e))?;
    // Other volumes of the container may remain.
    match std::fs::remove_dir(cid_dir) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::ENOENT)) => Ok(()),
        Err(e) => Err(VolError::internal(
            format!("removing {}", cid_dir.display()),
            e,
        )),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
