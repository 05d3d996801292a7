//! Directory-fd-relative file operations that never follow a symlink.
//!
//! Every operation takes the directory it works in as an open fd and one
//! plain name (validated in `path.rs`); directories are entered with
//! `O_DIRECTORY | O_NOFOLLOW` and files created with `O_EXCL | O_NOFOLLOW`.
//! So nothing inside a volume, even a link planted by a container that
//! could write its copy, can redirect a write or a removal elsewhere in the
//! guest. (nix's `*at` calls are enough here; a capability crate such as
//! cap-std would add a dependency to PID 1 for the same guarantee.)

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, fchownat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::path::MAX_DEPTH;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Ownership and permission bits for something we create.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Attrs {
    /// chown before chmod: chown clears the set-id bits.
    pub fn apply(&self, fd: BorrowedFd<'_>) -> nix::Result<()> {
        fchown(
            fd,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        )?;
        fchmod(fd, Mode::from_bits_truncate(self.mode & 0o7777))
    }
}

/// Opens the directory at `path` (whose components are the agent's own;
/// only the last must not be a symlink).
pub fn open_dir(path: &std::path::Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(path, DIR_FLAGS, Mode::empty())
}

/// Opens the directory `name` in `dir`; a symlink there is ELOOP/ENOTDIR.
pub fn open_dir_at(
    dir: BorrowedFd<'_>,
    name: &(impl AsRef<OsStr> + ?Sized),
) -> nix::Result<OwnedFd> {
    openat(dir, name.as_ref(), DIR_FLAGS, Mode::empty())
}

/// Opens the directory that holds `parts`' last component, one component
/// at a time from `root`.
pub fn open_parent(root: BorrowedFd<'_>, parts: &[&str]) -> nix::Result<OwnedFd> {
    let mut dir = open_dir_at(root, ".")?;
    for part in &parts[..parts.len().saturating_sub(1)] {
        dir = open_dir_at(dir.as_fd(), *part)?;
    }
    Ok(dir)
}

/// Creates the directory `name` (it must not exist) with `attrs`.
pub fn make_dir_at(dir: BorrowedFd<'_>, name: &str, attrs: Attrs) -> nix::Result<()> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o700))?;
    let fd = open_dir_at(dir, name)?;
    attrs.apply(fd.as_fd())
}

/// Creates the file `name` (it must not exist) with `data` and `attrs`.
pub fn create_file_at(
    dir: BorrowedFd<'_>,
    name: &str,
    data: &[u8],
    attrs: Attrs,
) -> nix::Result<()> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data).map_err(io_errno)?;
    attrs.apply(file.as_fd())
}

/// Appends `data` to the regular file `name`, which must hold exactly
/// `offset` bytes (the pieces of a file arrive in order).
pub fn append_file_at(
    dir: BorrowedFd<'_>,
    name: &str,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    let flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::empty())
        .map_err(|e| format!("cannot open it to continue it: {e} (was its first piece sent?)"))?;
    let st = fstat(&fd).map_err(|e| format!("fstat: {e}"))?;
    let size = u64::try_from(st.st_size).unwrap_or_default();
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG || size != offset {
        return Err(format!(
            "a piece at offset {offset} does not continue it: it holds {size} bytes"
        ));
    }
    std::fs::File::from(fd)
        .write_all(data)
        .map_err(|e| format!("write: {e}"))
}

/// Creates the symlink `name` -> `target` owned by `uid`:`gid`.
pub fn symlink_at(
    dir: BorrowedFd<'_>,
    name: &str,
    target: &str,
    owner: Option<(u32, u32)>,
) -> nix::Result<()> {
    symlinkat(target, dir, name)?;
    if let Some((uid, gid)) = owner {
        let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// `rename(2)` within one directory: atomic for every reader.
pub fn rename_at(dir: BorrowedFd<'_>, from: &str, to: &str) -> nix::Result<()> {
    renameat(dir, from, dir, to)
}

/// The target of the symlink `name`, or None if it is not one (or absent).
pub fn link_target(dir: BorrowedFd<'_>, name: &OsStr) -> Option<OsString> {
    readlinkat(dir, name).ok()
}

/// The names in `dir`, without `.` and `..`.
pub fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::from_fd(open_dir_at(dir, ".")?)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    Ok(names)
}

/// Removes `name` from `dir`, recursively, never following a symlink;
/// absent is fine.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    remove_tree_depth(dir, name, 0)
}

fn remove_tree_depth(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> nix::Result<()> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        // Deeper than anything we create: someone built it to exhaust us.
        if depth > MAX_DEPTH {
            return Err(Errno::ELOOP);
        }
        let sub = open_dir_at(dir, name)?;
        for child in list(sub.as_fd())? {
            remove_tree_depth(sub.as_fd(), &child, depth + 1)?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Err(Errno::ENOENT) => Ok(()),
            r => r,
        }
    }
}

/// The errno inside an I/O error (EIO if it has none).
fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}
