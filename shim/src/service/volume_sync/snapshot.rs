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
//!
//! The read goes through descriptors only and never follows a link
//! (volume_dir.rs): a guest that can write the directory can make it fail,
//! never make it read a host file outside it.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use clh_agent_protocol::{VolumeEntry, VolumeEntryKind};
use rustix::fs::{fstat, readlinkat, Dir, FileType, OFlags, Stat};
use rustix::io::Errno;

use super::volume_dir::{file_type, open_beneath, VolumeDir};

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

/// Reads `..data`'s `target` in `dir` into entries (parents first, names
/// sorted), handing each full batch to `emit` (false: stop, the receiver
/// is gone). Blocking: run it off the async runtime.
///
/// Every entry is opened relative to its parent's descriptor, one name at
/// a time, without following a link (volume_dir.rs); its type, mode and
/// owner come from that descriptor. A directory or file is read through
/// the descriptor that was checked; a link is copied as a link.
pub fn read(
    dir: &VolumeDir,
    target: &OsStr,
    chunk: usize,
    emit: &mut dyn FnMut(Vec<VolumeEntry>) -> bool,
) -> Result<Outcome, SnapshotError> {
    let Some(data) = dir.open_data(target)? else {
        return Ok(Outcome::Vanished);
    };
    let mut reader = Reader {
        batch: Batch::new(chunk),
        emit,
        cancelled: false,
    };
    match reader.dir(&data, &dir.path().join(target), "", 0) {
        Ok(()) if reader.cancelled => Ok(Outcome::Cancelled),
        Ok(()) => Ok(Outcome::Complete(reader.batch.entries)),
        Err(SnapshotError::Read { source, .. }) if overtaken(&source) => Ok(Outcome::Vanished),
        Err(e) => Err(e),
    }
}

/// An error that means the data changed under the read. The kubelet never
/// changes a published directory, so it is an update that overtook us
/// (the old data removed), or a guest rewriting a directory it can write:
/// either way the read starts again and, if it never settles, fails.
fn overtaken(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.raw_os_error()
            .is_some_and(|n| [libc::ELOOP, libc::EAGAIN, libc::ESTALE].contains(&n))
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

    /// The entries of the directory open at `fd` (`path` for messages).
    fn dir(
        &mut self,
        fd: &OwnedFd,
        path: &Path,
        rel: &str,
        depth: usize,
    ) -> Result<(), SnapshotError> {
        if depth > MAX_DEPTH {
            return Err(SnapshotError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("nested deeper than {MAX_DEPTH} directories"),
            });
        }
        let read_err = |e: Errno| SnapshotError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        };
        let mut names: Vec<OsString> = Vec::new();
        for entry in Dir::read_from(fd).map_err(read_err)? {
            let name = entry.map_err(read_err)?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name));
            }
        }
        names.sort();
        for name in names {
            if self.cancelled {
                return Ok(());
            }
            let path = path.join(&name);
            let text = name.to_str().ok_or_else(|| SnapshotError::Unsupported {
                path: path.clone(),
                reason: "the name is not UTF-8".into(),
            })?;
            let rel = if rel.is_empty() {
                text.to_owned()
            } else {
                format!("{rel}/{text}")
            };
            self.entry(fd, &name, &path, rel, depth)?;
        }
        Ok(())
    }

    /// Entry `name` of the directory open at `parent`: opened as itself
    /// (`O_PATH | O_NOFOLLOW`, a link included), described by `fstat` of
    /// that descriptor, then read through it.
    fn entry(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        rel: String,
        depth: usize,
    ) -> Result<(), SnapshotError> {
        let read_err = |e: Errno| SnapshotError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        };
        let fd = open_beneath(parent, name, OFlags::PATH).map_err(read_err)?;
        let st = fstat(&fd).map_err(read_err)?;
        let base = VolumeEntry {
            path: rel.clone(),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            ..Default::default()
        };
        match file_type(&st) {
            FileType::Directory => {
                // "." of the checked descriptor: the same directory.
                let dir = open_beneath(&fd, OsStr::new("."), OFlags::RDONLY | OFlags::DIRECTORY)
                    .map_err(read_err)?;
                self.push(VolumeEntry {
                    kind: VolumeEntryKind::DIR.into(),
                    ..base
                });
                self.dir(&dir, path, &rel, depth + 1)
            }
            FileType::Symlink => {
                // The link itself (an empty path reads the O_PATH fd's).
                let target = readlinkat(&fd, "", Vec::new()).map_err(read_err)?;
                let target = target
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
            }
            FileType::RegularFile => {
                let file = open_file(parent, name, &st).map_err(read_err)?;
                self.file(file, path, base)
            }
            other => {
                let kind = match other {
                    FileType::Fifo => "a FIFO",
                    FileType::Socket => "a socket",
                    _ => "a device",
                };
                Err(SnapshotError::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!("it is {kind}"),
                })
            }
        }
    }

    /// A file's content in pieces: the first (offset 0) always, even when
    /// empty; the next ones each in a batch of their own once one is full.
    fn file(
        &mut self,
        mut file: std::fs::File,
        path: &Path,
        base: VolumeEntry,
    ) -> Result<(), SnapshotError> {
        let read_err = |source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        };
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

/// Opens regular file `name` of `parent` for reading, the object that was
/// checked (`checked`, from its `O_PATH` descriptor) and nothing else: no
/// link (`O_NOFOLLOW`), never blocking on a FIFO swapped in meanwhile
/// (`O_NONBLOCK`); a different object now is ELOOP or ESTALE, which the
/// caller takes as a change under the read.
pub(super) fn open_file(
    parent: &OwnedFd,
    name: &OsStr,
    checked: &Stat,
) -> Result<std::fs::File, Errno> {
    let fd = open_beneath(parent, name, OFlags::RDONLY | OFlags::NONBLOCK)?;
    let st = fstat(&fd)?;
    let same = (st.st_dev, st.st_ino) == (checked.st_dev, checked.st_ino);
    if !same || file_type(&st) != FileType::RegularFile {
        return Err(Errno::STALE);
    }
    Ok(std::fs::File::from(fd))
}
