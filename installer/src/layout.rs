//! The installed tree under the prefix (`/opt/clh-shim`):
//!
//! ```text
//! versions/<id>/...            one complete payload per version, never modified
//! current -> versions/<id>     swapped by rename: containerd's runtime_path goes through it
//! install-state.json           what was changed on the node (state.rs)
//! backup/                      the node's containerd config as it was
//! ```
//!
//! A version directory is filled under a temporary name and renamed into
//! place complete; files in it are never rewritten, so a running shim or
//! VMM never sees its binary or image change ("text file busy" cannot
//! happen). An old version is removed only when no process runs from it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{io, Result};
use crate::fsutil;
use crate::payload::Payload;

pub const CURRENT: &str = "current";
pub const VERSIONS: &str = "versions";
/// Written last into a version dir: a dir without it is an interrupted copy.
const COMPLETE: &str = ".complete";

/// The prefix as the host sees it (`prefix`, written into containerd's
/// config) and where this process reaches it (`on_host`, under the host
/// root: `/host/opt/clh-shim` inside the installer's pod).
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: PathBuf,
    pub on_host: PathBuf,
}

impl Layout {
    pub fn new(host_root: &Path, prefix: &Path) -> Layout {
        Layout {
            prefix: prefix.to_path_buf(),
            on_host: crate::under_root(host_root, prefix),
        }
    }

    pub fn version_dir(&self, id: &str) -> PathBuf {
        self.on_host.join(VERSIONS).join(id)
    }

    /// A path inside version `id` as the host sees it.
    pub fn host_view(&self, id: &str, relative: &str) -> PathBuf {
        self.prefix.join(VERSIONS).join(id).join(relative)
    }

    /// A path through `current`, as the host sees it.
    pub fn current_view(&self, relative: &str) -> PathBuf {
        self.prefix.join(CURRENT).join(relative)
    }

    /// Copies the payload into `versions/<id>` with `config` as its shim
    /// configuration, unless that version is already complete. Returns
    /// whether it copied.
    pub fn install_version(&self, payload: &Payload, id: &str, config: &[u8]) -> Result<bool> {
        let dest = self.version_dir(id);
        if dest.join(COMPLETE).is_file() {
            return Ok(false);
        }
        let versions = self.on_host.join(VERSIONS);
        fsutil::create_dirs(&versions)?;
        let tmp = versions.join(format!(".{id}.partial.{}", std::process::id()));
        let copied = self.fill(payload, &tmp, config).and_then(|()| {
            if dest.exists() {
                // An interrupted earlier copy: never complete, never used.
                fs::remove_dir_all(&dest).map_err(io("removing incomplete", &dest))?;
            }
            fs::rename(&tmp, &dest).map_err(io("renaming into place", &dest))
        });
        if let Err(e) = copied {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fsutil::sync_dir(&versions)?;
        Ok(true)
    }

    fn fill(&self, payload: &Payload, dir: &Path, config: &[u8]) -> Result<()> {
        for f in &payload.files {
            let to = dir.join(&f.relative);
            if let Some(parent) = to.parent() {
                fsutil::create_dirs(parent)?;
            }
            let mode = if f.executable { 0o755 } else { 0o644 };
            if f.relative == Path::new(crate::payload::CONFIG) {
                fs::write(&to, config).map_err(io("writing", &to))?;
            } else {
                let from = payload.root.join(&f.relative);
                fs::copy(&from, &to).map_err(io("copying", &from))?;
            }
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                .map_err(io("setting the mode of", &to))?;
            fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing", &to))?;
        }
        fs::write(dir.join(COMPLETE), b"").map_err(io("writing", &dir.join(COMPLETE)))
    }

    /// The version `current` points at.
    pub fn current(&self) -> Option<String> {
        let target = fs::read_link(self.on_host.join(CURRENT)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// Points `current` at version `id` (a new symlink renamed over the
    /// old one: containerd sees one or the other). Returns whether it moved.
    pub fn set_current(&self, id: &str) -> Result<bool> {
        if self.current().as_deref() == Some(id) {
            return Ok(false);
        }
        let link = self.on_host.join(CURRENT);
        let tmp = self
            .on_host
            .join(format!(".{CURRENT}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        // Relative, so that it resolves the same from the host and from
        // the installer's pod.
        std::os::unix::fs::symlink(Path::new(VERSIONS).join(id), &tmp)
            .map_err(io("creating", &tmp))?;
        fs::rename(&tmp, &link).map_err(io("renaming into place", &link))?;
        fsutil::sync_dir(&self.on_host)?;
        Ok(true)
    }

    /// Every version directory (complete or not), by id.
    pub fn versions(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.on_host.join(VERSIONS)) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        ids.sort();
        ids
    }
}
