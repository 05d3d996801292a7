//! A synced volume's host directory, opened once and never resolved by
//! path again: everything under it is reached relative to a file
//! descriptor, without following a single link.
//!
//! Whatever a guest may have planted in the directory (`..data` pointing
//! at a `..x -> /etc` link, a symlinked subdirectory, a file swapped for a
//! link mid-read), the reader only ever opens objects that lie in the
//! directory, on its filesystem: [`open_beneath`] passes `openat2`
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV`, one name at a time, and links inside the volume are
//! read with `readlinkat`, as links.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{fstat, openat2, readlinkat, FileType, Mode, OFlags, ResolveFlags, Stat, CWD};
use rustix::io::Errno;

use super::snapshot::{SnapshotError, DATA};

/// How every name below the volume's directory is resolved: never through
/// a symlink (a trailing one is opened as itself only with `O_PATH |
/// O_NOFOLLOW`, else refused), never above the starting directory, never
/// onto another mount.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Opens `name` (one component, or a relative path without links) under
/// `dir` as the module doc says.
pub fn open_beneath(dir: impl AsFd, name: &OsStr, flags: OFlags) -> Result<OwnedFd, Errno> {
    openat2(
        dir,
        name,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    )
}

/// The volume's directory: an `O_PATH` descriptor held for the sync's life,
/// so the directory the sync began with is the one read at every update,
/// whatever happens to its path.
#[derive(Debug)]
pub struct VolumeDir {
    /// For messages only; never opened again.
    path: PathBuf,
    /// Where it was when opened, to compare with guest-writable paths.
    canonical: PathBuf,
    fd: OwnedFd,
}

impl VolumeDir {
    /// Opens `path` (which may be reached through links, e.g. a kubelet
    /// root dir that is a symlink: it is canonicalised first, then opened
    /// with every link refused, so a swap in between fails).
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let read_err = |source| SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        };
        let canonical = std::fs::canonicalize(path).map_err(read_err)?;
        let fd = openat2(
            CWD,
            &canonical,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| read_err(e.into()))?;
        Ok(VolumeDir {
            path: path.to_path_buf(),
            canonical,
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn canonical(&self) -> &Path {
        &self.canonical
    }

    /// A path to the very directory held, for inotify (which takes paths):
    /// the kernel resolves our own fd's magic link to the held inode, so
    /// the watch never lands on something a guest put at the path.
    pub fn watch_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The directory's own metadata.
    pub fn stat(&self) -> Result<Stat, SnapshotError> {
        fstat(&self.fd).map_err(|e| self.read_err(&self.path, e))
    }

    /// Whether the directory was removed (the kubelet tore the volume down).
    pub fn is_removed(&self) -> bool {
        self.stat().map_or(true, |s| s.st_nlink == 0)
    }

    /// `..data`'s target if the directory has the atomic writer's layout: a
    /// symlink to one name starting with `..`; None if it has no `..data`.
    /// The target is only text here: [`VolumeDir::open_data`] opens it.
    pub fn data_target(&self) -> Result<Option<OsString>, SnapshotError> {
        let target = match readlinkat(&self.fd, DATA, Vec::new()) {
            Ok(t) => OsStr::from_bytes(t.as_bytes()).to_os_string(),
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::INVAL) => return Err(self.not_atomic("its ..data is not a symlink")),
            Err(e) => return Err(self.read_err(&self.path.join(DATA), e)),
        };
        let ok = target.as_bytes().starts_with(b"..")
            && Path::new(&target).components().count() == 1
            && target != ".."
            && target != DATA;
        if !ok {
            let reason = format!(
                "its ..data points to {target:?}, not to a sibling ..<timestamp> directory"
            );
            return Err(self.not_atomic(&reason));
        }
        Ok(Some(target))
    }

    /// Whether `target` is a real directory in the volume (no link).
    pub fn has_data_dir(&self, target: &OsStr) -> bool {
        let flags = OFlags::PATH | OFlags::DIRECTORY;
        open_beneath(&self.fd, target, flags).is_ok()
    }

    /// Opens `..data`'s `target` for reading: a directory in the volume
    /// itself, never a link (a `..x -> /host/dir` planted by a guest is
    /// refused, not followed). Ok(None): it is gone (an update overtook).
    pub fn open_data(&self, target: &OsStr) -> Result<Option<OwnedFd>, SnapshotError> {
        match open_beneath(&self.fd, target, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV) => Err(self.not_atomic(&format!(
                "its ..data points to {target:?}, which is not a plain directory in the volume \
                 (a symlink or a mount point); links are never followed"
            ))),
            Err(e) => Err(self.read_err(&self.path.join(target), e)),
        }
    }

    fn not_atomic(&self, reason: &str) -> SnapshotError {
        SnapshotError::NotAtomicWriter {
            dir: self.path.clone(),
            reason: reason.to_owned(),
        }
    }

    fn read_err(&self, path: &Path, e: Errno) -> SnapshotError {
        SnapshotError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// The file type in `st`.
pub fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}
