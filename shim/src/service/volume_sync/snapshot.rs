//! Reading one consistent snapshot of an atomic-writer volume on the host,
//! cut into pieces that each fit one SyncVolume call.
//!
//! The kubelet never changes a published `..<timestamp>` directory: an
//! update writes a new one and renames `..data` over to it, then removes
//! the old one. So a snapshot is consistent when it is read entirely
//! through one target of `..data`, resolved once, and `..data` still has
//! that target at the end; a file that vanished meanwhile (the old data was
//! removed) or a changed target means an update overtook the read, which
//! the caller then starts again.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use clh_agent_protocol::{VolumeEntry, VolumeEntryKind};

/// The atomic writer's pointer to the current data.
pub const DATA: &str = "..data";
/// The most content one SyncVolume call carries. ttrpc refuses messages
/// over 4 MiB (`ttrpc::proto::MESSAGE_LENGTH_MAX`, both ways); half of it
/// leaves ample room for paths and framing.
pub const MAX_CHUNK_BYTES: usize = 2 << 20;
/// What an entry costs besides its path, data and target (an upper bound
/// of its protobuf framing and fixed fields).
const ENTRY_OVERHEAD: usize = 64;
/// A piece smaller than this is not worth a call of its own: the batch is
/// sent first and the file starts in the next one.
const MIN_PIECE: usize = 64 << 10;
/// Deeper than the kubelet ever nests item paths.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "{dir} is not laid out by the kubelet's atomic writer ({reason}); \
         share it through virtio-fs instead"
    )]
    NotAtomicWriter { dir: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}; such an entry cannot be copied into the guest")]
    Unsupported { path: PathBuf, reason: String },
}

/// How reading a snapshot ended.
#[derive(Debug)]
pub enum Outcome {
    /// Everything was read; these are the entries not yet emitted.
    Complete(Vec<VolumeEntry>),
    /// Something vanished while reading: an update overtook us.
    Vanished,
    /// The receiver of the pieces went away.
    Cancelled,
}

/// `..data`'s target if `host_dir` has the atomic writer's layout: a
/// symlink to one name starting with `..`; None if it has no `..data`.
pub fn data_target(host_dir: &Path) -> Result<Option<OsString>, SnapshotError> {
    let link = host_dir.join(DATA);
    let target = match std::fs::read_link(&link) {
        Ok(t) => t.into_os_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
            return Err(not_atomic(host_dir, "its ..data is not a symlink"))
        }
        Err(source) => return Err(SnapshotError::Read { path: link, source }),
    };
    let ok = target.as_encoded_bytes().starts_with(b"..")
        && Path::new(&target).components().count() == 1
        && target != ".."
        && target != DATA;
    if !ok {
        let reason =
            format!("its ..data points to {target:?}, not to a sibling ..<timestamp> directory");
        return Err(not_atomic(host_dir, &reason));
    }
    Ok(Some(target))
}

fn not_atomic(dir: &Path, reason: &str) -> SnapshotError {
    SnapshotError::NotAtomicWriter {
        dir: dir.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// Reads `<host_dir>/<target>` into entries (parents first, names sorted),
/// handing each full batch to `emit` (false: stop, the receiver is gone).
/// Blocking: run it off the async runtime.
pub fn read(
    host_dir: &Path,
    target: &OsStr,
    chunk: usize,
    emit: &mut dyn FnMut(Vec<VolumeEntry>) -> bool,
) -> Result<Outcome, SnapshotError> {
    let mut reader = Reader {
        batch: Batch::new(chunk),
        emit,
        cancelled: false,
    };
    match reader.dir(&host_dir.join(target), "", 0) {
        Ok(()) if reader.cancelled => Ok(Outcome::Cancelled),
        Ok(()) => Ok(Outcome::Complete(reader.batch.entries)),
        Err(SnapshotError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(Outcome::Vanished)
        }
        Err(e) => Err(e),
    }
}

/// Entries gathered for the next call, within the chunk budget.
struct Batch {
    entries: Vec<VolumeEntry>,
    bytes: usize,
    chunk: usize,
}

impl Batch {
    fn new(chunk: usize) -> Self {
        Batch {
            entries: Vec::new(),
            bytes: 0,
            chunk,
        }
    }

    fn cost(e: &VolumeEntry) -> usize {
        ENTRY_OVERHEAD + e.path.len() + e.target.len() + e.data.len()
    }

    /// The content room left for a file piece at `path`.
    fn room(&self, path: &str) -> usize {
        self.chunk
            .saturating_sub(self.bytes + ENTRY_OVERHEAD + path.len())
    }
}

struct Reader<'a> {
    batch: Batch,
    emit: &'a mut dyn FnMut(Vec<VolumeEntry>) -> bool,
    cancelled: bool,
}

impl Reader<'_> {
    fn flush(&mut self) {
        if self.batch.entries.is_empty() || self.cancelled {
            return;
        }
        let entries = std::mem::take(&mut self.batch.entries);
        self.batch.bytes = 0;
        if !(self.emit)(entries) {
            self.cancelled = true;
        }
    }

    fn push(&mut self, e: VolumeEntry) {
        let cost = Batch::cost(&e);
        if self.batch.bytes + cost > self.batch.chunk {
            self.flush();
        }
        self.batch.bytes += cost;
        self.batch.entries.push(e);
    }

    fn dir(&mut self, dir: &Path, rel: &str, depth: usize) -> Result<(), SnapshotError> {
        if depth > MAX_DEPTH {
            return Err(SnapshotError::Unsupported {
                path: dir.to_path_buf(),
                reason: format!("nested deeper than {MAX_DEPTH} directories"),
            });
        }
        let read_err = |source| SnapshotError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut names: Vec<OsString> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        names.sort();
        for name in names {
            if self.cancelled {
                return Ok(());
            }
            let path = dir.join(&name);
            let name = name.to_str().ok_or_else(|| SnapshotError::Unsupported {
                path: path.clone(),
                reason: "the name is not UTF-8".into(),
            })?;
            let rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            self.entry(&path, rel, depth)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: String, depth: usize) -> Result<(), SnapshotError> {
        let read_err = |source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::symlink_metadata(path).map_err(read_err)?;
        let base = VolumeEntry {
            path: rel.clone(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            ..Default::default()
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            self.push(VolumeEntry {
                kind: VolumeEntryKind::DIR.into(),
                ..base
            });
            self.dir(path, &rel, depth + 1)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(read_err)?;
            let target =
                target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| SnapshotError::Unsupported {
                        path: path.to_path_buf(),
                        reason: "the symlink's target is not UTF-8".into(),
                    })?;
            self.push(VolumeEntry {
                kind: VolumeEntryKind::SYMLINK.into(),
                target,
                ..base
            });
            Ok(())
        } else if ft.is_file() {
            self.file(path, base)
        } else {
            let kind = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            Err(SnapshotError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("it is {kind}"),
            })
        }
    }

    /// A file's content in pieces: the first (offset 0) always, even when
    /// empty; the next ones each in a batch of their own once one is full.
    fn file(&mut self, path: &Path, base: VolumeEntry) -> Result<(), SnapshotError> {
        let read_err = |source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let mut offset = 0u64;
        loop {
            if self.batch.room(&base.path) < MIN_PIECE {
                self.flush();
            }
            let room = self.batch.room(&base.path).max(1);
            let mut data = Vec::new();
            let limit = u64::try_from(room).unwrap_or(u64::MAX);
            (&mut file)
                .take(limit)
                .read_to_end(&mut data)
                .map_err(read_err)?;
            if data.is_empty() && offset > 0 {
                return Ok(());
            }
            let len = data.len();
            self.push(VolumeEntry {
                kind: VolumeEntryKind::FILE.into(),
                data,
                offset,
                ..base.clone()
            });
            offset += u64::try_from(len).unwrap_or(u64::MAX);
            if len < room || self.cancelled {
                // A short read is the end of the file.
                return Ok(());
            }
        }
    }
}
