//! ConfigMap, Secret, projected and downward-API volumes: copied into the
//! guest and pushed again on every kubelet update, instead of shared
//! through virtio-fs (docs/design/0003-volume-sync.md).
//!
//! Through virtio-fs a container would see the kubelet's atomic updates
//! late (virtiofsd's cache timeout) and its inotify watches would never
//! fire (FUSE has no remote change notification). So for such a volume the
//! shim sends a full snapshot of it to the agent (SyncVolume), which keeps
//! a copy in guest tmpfs laid out as the kubelet's atomic writer lays it
//! out, then watches the host directory with inotify and sends a new
//! snapshot whenever `..data` is swapped. The container mounts the copy.
//!
//! Wiring (create.rs / binds.rs): record the container's read-write bind
//! sources in the pod's [`WritableShares`] first; then for a bind mount
//! that passes [`should_sync`], do not bind-mount it into the shared
//! directory; [`start`] a [`VolumeSync`] before CreateContainer, set the
//! mount's source to [`guest_dir`] (keep its type and options, `ro`
//! included), keep the handle with the container and [`VolumeSync::stop`]
//! it after RemoveContainer.
//!
//! What is synced, and how it is read, keeps the guest from choosing what
//! the shim reads on the host as root (docs/design/0003-volume-sync.md,
//! "Security: the host side"): a mount the container may write, or one
//! overlapping a path the pod's guest can write ([`WritableShares`]), is
//! never synced; a synced directory is held open and read through
//! descriptors only, without following a link (volume_dir.rs).

mod snapshot;
mod volume_dir;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clh_agent_client::AgentClient;
use clh_agent_protocol::{SyncVolumeRequest, VolumeEntry, GUEST_VOLUMES_DIR};
use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::writable_shares::WritableShares;
pub use snapshot::SnapshotError;
use snapshot::{Outcome, DATA, MAX_CHUNK_BYTES};
use volume_dir::VolumeDir;

/// Events that arrive this close together are one update (the kubelet's
/// rename of `..data` is followed at once by its link and dir changes).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often `..data` is checked without an event: catches an update the
/// watch missed (a queue overflow, a lost watch) and retries a failed push.
const RECHECK: Duration = Duration::from_secs(1);
/// Updates overtaking a read this many times in a row are an error.
const ATTEMPTS: u32 = 5;
/// How long [`VolumeSync::stop`] waits for a push in progress.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot watch {dir} for updates: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "agent {call} for {dir} (volume {volume} of container {cid}) failed; \
         is the guest image from the same release as the shim?"
    )]
    Agent {
        call: &'static str,
        dir: PathBuf,
        cid: String,
        volume: u32,
        // Boxed: the client's error is large, and this enum is returned often.
        #[source]
        source: Box<clh_agent_client::Error>,
    },
    #[error("{dir} changed under every one of {ATTEMPTS} reads in a row; try again")]
    Unstable { dir: PathBuf },
    #[error("volume index {0} is out of range")]
    Index(usize),
    #[error(
        "{dir} is not synced (any more): the pod's guest can write {share} through a \
         read-write mount, so it could choose what the shim reads; the container keeps \
         the last copy. To have the directory kept current, mount nothing that holds or \
         lies in it read-write in the same pod"
    )]
    GuestWritable { dir: PathBuf, share: PathBuf },
}

impl SyncError {
    /// The agent connection is gone (the VM stopped): nothing to retry.
    fn is_closed(&self) -> bool {
        matches!(self, SyncError::Agent { source, .. } if source.is_disconnected())
    }

    /// The sync must end: nothing will ever be pushed again.
    fn is_final(&self) -> bool {
        self.is_closed() || matches!(self, SyncError::GuestWritable { .. })
    }
}

/// Whether the bind mount source `host_source` is synced rather than shared:
/// a directory laid out by the kubelet's atomic writer, i.e. holding a
/// `..data` symlink to a sibling `..<timestamp>` directory.
///
/// The layout, not the path, decides: every ConfigMap, Secret, projected
/// and downward-API volume has it (`.../volumes/kubernetes.io~configmap/`,
/// `~secret`, `~projected`, `~downward-api`, under any kubelet root dir),
/// so do other atomic-writer volumes (e.g. the secrets-store CSI driver),
/// and the sync relies on it for consistent snapshots. A subPath mount of
/// such a volume is a file or a plain subdirectory and stays on virtio-fs,
/// as on a node, where subPath mounts do not receive updates either.
///
/// The layout alone does not make a mount synced: see [`should_sync`].
pub fn is_synced_volume(host_source: &Path) -> bool {
    // The source itself may be reached through links (a kubelet root dir
    // that is a symlink); its `..data` target must be a real directory.
    let Ok(dir) = VolumeDir::open(host_source) else {
        return false;
    };
    matches!(dir.data_target(), Ok(Some(t)) if dir.has_data_dir(&t))
}

/// Whether a bind mount of `host_source` is synced: only when the spec
/// mounts it read-only (a mount the container may write is the container's
/// to write: it stays shared), it has the atomic writer's layout, and the
/// pod's guest cannot write it, nor anything in it, nor a directory
/// holding it (`writable`). The kubelet mounts every ConfigMap, Secret,
/// projected and downward-API volume read-only, in its own directory that
/// no other volume shares; an `emptyDir` or `hostPath` a guest laid out
/// like one stays a plain virtio-fs mount.
pub fn should_sync(host_source: &Path, readonly: bool, writable: &WritableShares) -> bool {
    if !readonly || !is_synced_volume(host_source) {
        return false;
    }
    let Ok(canonical) = std::fs::canonicalize(host_source) else {
        return false;
    };
    match writable.overlapping(&canonical) {
        Some(share) => {
            info!(
                dir = %host_source.display(),
                share = %share.display(),
                "the pod's guest can write this atomic-writer directory; it is shared, not synced"
            );
            false
        }
        None => true,
    }
}

/// The guest path of the copy of mount `n` of container `cid`: the mount's
/// source in the spec given to CreateContainer.
pub fn guest_dir(cid: &str, n: usize) -> String {
    format!("{GUEST_VOLUMES_DIR}/{cid}/{n}")
}

/// A push that reached the guest.
#[derive(Debug, Clone, Copy)]
pub struct Pushed {
    pub generation: u64,
    /// When the agent confirmed the commit.
    pub at: Instant,
}

/// One synced volume: its watcher task. Owned by the container; dropping
/// it stops the watcher (the guest copy stays until [`VolumeSync::stop`]
/// or the VM's end).
pub struct VolumeSync {
    guest_dir: String,
    pusher: Pusher,
    pushed: watch::Receiver<Pushed>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Sends the first snapshot of `host_dir` as volume `n` of container `cid`
/// (so the copy is complete before the container is created), then keeps
/// the copy current until stopped, or until a path in `writable` (the
/// pod's guest-writable host paths) overlaps it.
pub async fn start(
    agent: AgentClient,
    host_dir: PathBuf,
    cid: &str,
    n: usize,
    writable: Arc<WritableShares>,
) -> Result<VolumeSync, SyncError> {
    let volume = u32::try_from(n).map_err(|_| SyncError::Index(n))?;
    let dir = Arc::new(VolumeDir::open(&host_dir)?);
    let mut pusher = Pusher {
        agent,
        cid: cid.to_owned(),
        volume,
        dir,
        writable,
        generation: 0,
    };
    // Watch first: an update during the first push is then not missed.
    let events = pusher.watch()?;
    let first = match pusher.push().await {
        Ok(first) => first,
        Err(e) => {
            pusher.remove().await;
            return Err(e);
        }
    };
    info!(dir = %pusher.dir.path().display(), cid, volume, "volume synced into the guest");
    let (pushed_tx, pushed) = watch::channel(Pushed {
        generation: pusher.generation,
        at: Instant::now(),
    });
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(watch_loop(
        pusher.clone(),
        Some(events),
        first,
        stop_rx,
        pushed_tx,
    ));
    Ok(VolumeSync {
        guest_dir: guest_dir(cid, n),
        pusher,
        pushed,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

impl VolumeSync {
    /// The copy's path in the guest (the container's mount source).
    pub fn guest_dir(&self) -> &str {
        &self.guest_dir
    }

    /// The last push that reached the guest; changes with each one.
    pub fn pushed(&self) -> watch::Receiver<Pushed> {
        self.pushed.clone()
    }

    /// Stops watching (a push in progress gets [`STOP_TIMEOUT`]), then
    /// removes the guest copy. Call it once the container is removed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.pusher.remove().await;
    }
}

impl Drop for VolumeSync {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

type Events = inotify::EventStream<Vec<u8>>;

/// What an inotify event on the volume's directory means for us.
#[derive(Debug, PartialEq, Eq)]
enum Trigger {
    /// `..data` was swapped (or events were lost): look again.
    Update,
    /// The watch ended: the directory was removed, moved or unmounted.
    WatchGone,
    Nothing,
}

fn classify(mask: EventMask, name: Option<&OsStr>) -> Trigger {
    if mask.contains(EventMask::Q_OVERFLOW) {
        Trigger::Update
    } else if mask.intersects(
        EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT,
    ) {
        Trigger::WatchGone
    } else if name == Some(OsStr::new(DATA))
        && mask.intersects(EventMask::MOVED_TO | EventMask::CREATE)
    {
        Trigger::Update
    } else {
        Trigger::Nothing
    }
}

/// Pushes on `..data` events and on a changed target at each recheck, until
/// stopped, the directory is gone or the agent connection is closed.
async fn watch_loop(
    mut pusher: Pusher,
    mut events: Option<Events>,
    mut last: OsString,
    mut stop: oneshot::Receiver<()>,
    pushed: watch::Sender<Pushed>,
) {
    let dir = pusher.dir.path().to_path_buf();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = &mut stop => return,
            ev = next_event(&mut events) => ev,
            _ = recheck.tick() => Trigger::Update,
        };
        let trigger = match trigger {
            Trigger::Nothing => continue,
            // Coalesce a burst; a lost watch in it still counts.
            Trigger::Update => debounce(&mut events).await,
            Trigger::WatchGone => Trigger::WatchGone,
        };
        // Checked at every turn: while we hold the directory open, its
        // removal may not end the watch (the inode lives on).
        if pusher.dir.is_removed() {
            info!(dir = %dir.display(), "the volume's directory is gone; its sync ends");
            return;
        }
        if trigger == Trigger::WatchGone {
            // Still there (the watch was dropped): watch the directory we
            // hold anew, or fall back to the rechecks alone.
            events = pusher
                .watch()
                .inspect_err(|e| warn!("{e}; relying on rechecks every {RECHECK:?}"))
                .ok();
        }
        if let Err(e) = pusher.check_writable() {
            warn!("{e}");
            return;
        }
        match pusher.dir.data_target() {
            Ok(Some(t)) if t == last => continue,
            Ok(_) => {}
            Err(e) => {
                debug!("{e}");
                continue;
            }
        }
        match pusher.push().await {
            Ok(target) => {
                last = target;
                debug!(dir = %dir.display(), generation = pusher.generation, "volume update pushed");
                pushed.send_replace(Pushed {
                    generation: pusher.generation,
                    at: Instant::now(),
                });
            }
            Err(e) if e.is_closed() => {
                info!(dir = %dir.display(), "the agent is gone; the volume's sync ends");
                return;
            }
            Err(e) if e.is_final() => {
                warn!("{e}");
                return;
            }
            // Retried at the next recheck: `last` is unchanged.
            Err(e) => warn!("{e}"),
        }
    }
}

/// The next event's meaning; never resolves without a watch.
async fn next_event(events: &mut Option<Events>) -> Trigger {
    let Some(stream) = events else {
        return std::future::pending().await;
    };
    match stream.next().await {
        Some(Ok(ev)) => classify(ev.mask, ev.name.as_deref()),
        Some(Err(e)) => {
            warn!(error = %e, "reading inotify events; relying on rechecks");
            *events = None;
            Trigger::Update
        }
        None => {
            *events = None;
            Trigger::WatchGone
        }
    }
}

/// Swallows the events of one burst; WatchGone if one of them says so.
async fn debounce(events: &mut Option<Events>) -> Trigger {
    let mut result = Trigger::Update;
    while let Ok(t) = tokio::time::timeout(DEBOUNCE, next_event(events)).await {
        if t == Trigger::WatchGone {
            result = Trigger::WatchGone;
            break;
        }
    }
    result
}

/// Sends snapshots of one volume, each as a new generation.
#[derive(Clone)]
struct Pusher {
    agent: AgentClient,
    cid: String,
    volume: u32,
    /// Held open for the sync's life; read only through descriptors.
    dir: Arc<VolumeDir>,
    writable: Arc<WritableShares>,
    generation: u64,
}

impl Pusher {
    /// Refuses to go on once the pod's guest can write the directory.
    fn check_writable(&self) -> Result<(), SyncError> {
        match self.writable.overlapping(self.dir.canonical()) {
            Some(share) => Err(SyncError::GuestWritable {
                dir: self.dir.path().to_path_buf(),
                share,
            }),
            None => Ok(()),
        }
    }

    fn watch(&self) -> Result<Events, SyncError> {
        let err = |source| SyncError::Watch {
            dir: self.dir.path().to_path_buf(),
            source,
        };
        let inotify = Inotify::init().map_err(err)?;
        let mask = WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        // Through our descriptor: the directory held, not whatever is at
        // its path now.
        inotify
            .watches()
            .add(self.dir.watch_path(), mask)
            .map_err(err)?;
        inotify.into_event_stream(vec![0; 4096]).map_err(err)
    }

    /// Pushes the current content; returns the `..data` target it came from.
    async fn push(&mut self) -> Result<OsString, SyncError> {
        for _ in 0..ATTEMPTS {
            self.generation += 1;
            if let Some(target) = self.push_generation().await? {
                return Ok(target);
            }
            debug!(dir = %self.dir.path().display(), "an update overtook the read; reading again");
        }
        Err(SyncError::Unstable {
            dir: self.dir.path().to_path_buf(),
        })
    }

    /// One generation: pieces as they are read, then the commit once
    /// `..data` is seen unchanged. None: an update overtook the read.
    ///
    /// The guest-writable check runs before the read and again before the
    /// commit: a read-write share recorded while the read ran (before its
    /// mount, so before any guest write through it) stops the commit.
    async fn push_generation(&self) -> Result<Option<OsString>, SyncError> {
        self.check_writable()?;
        let dir = self.dir.path().to_path_buf();
        let target = self
            .dir
            .data_target()?
            .ok_or_else(|| SnapshotError::NotAtomicWriter {
                dir: dir.clone(),
                reason: "it has no ..data".into(),
            })?;
        // One batch in flight while the next is read: memory stays at
        // about two chunks whatever the volume's size.
        let (tx, mut rx) = mpsc::channel::<Vec<VolumeEntry>>(1);
        let (read_dir, read_target) = (self.dir.clone(), target.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let mut emit = |entries| tx.blocking_send(entries).is_ok();
            snapshot::read(&read_dir, &read_target, MAX_CHUNK_BYTES, &mut emit)
        });
        while let Some(entries) = rx.recv().await {
            self.call(entries, false).await?;
        }
        let rest = match reader.await {
            Ok(Ok(Outcome::Complete(rest))) => rest,
            Ok(Ok(Outcome::Vanished | Outcome::Cancelled)) => return Ok(None),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => {
                let source = std::io::Error::other(format!("the snapshot reader task: {e}"));
                return Err(SnapshotError::Read { path: dir, source }.into());
            }
        };
        self.check_writable()?;
        if self.dir.data_target()?.as_ref() != Some(&target) {
            return Ok(None);
        }
        self.call(rest, true).await?;
        Ok(Some(target))
    }

    async fn call(&self, entries: Vec<VolumeEntry>, commit: bool) -> Result<(), SyncError> {
        let mut req = SyncVolumeRequest {
            container_id: self.cid.clone(),
            volume: self.volume,
            generation: self.generation,
            entries,
            commit,
            ..Default::default()
        };
        if commit {
            let st = self.dir.stat()?;
            (req.root_mode, req.root_uid, req.root_gid) =
                (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        }
        self.agent
            .sync_volume(&req)
            .await
            .map_err(|source| self.agent_error("SyncVolume", source))
    }

    /// Removes the guest copy (best effort: the VM may be gone).
    async fn remove(&self) {
        if let Err(source) = self.agent.remove_volume(&self.cid, self.volume).await {
            let e = self.agent_error("RemoveVolume", source);
            if !e.is_closed() {
                warn!("{e}");
            }
        }
    }

    fn agent_error(&self, call: &'static str, source: clh_agent_client::Error) -> SyncError {
        SyncError::Agent {
            call,
            dir: self.dir.path().to_path_buf(),
            cid: self.cid.clone(),
            volume: self.volume,
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests;
