//! What gets installed: a payload directory laid out like an installed
//! version (`make node-payload` builds one; the installer image carries
//! one), and the version id naming it.
//!
//! ```text
//! bin/containerd-shim-clh-v2       the shim
//! bin/clh-install                  this installer (uninstall runs it from the node)
//! bin/virtiofsd, bin/vhost-device-vsock   optional: the node's own are used without them
//! share/clh-shim/vmlinux, vmlinuz, initramfs.cpio.gz   the guest image
//! etc/clh-shim/config.toml         the shim's configuration template
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io, InstallError, Result};
use crate::fsutil;

pub const SHIM: &str = "bin/containerd-shim-clh-v2";
pub const CONFIG: &str = "etc/clh-shim/config.toml";
const REQUIRED: &[&str] = &[
    SHIM,
    "share/clh-shim/vmlinux",
    "share/clh-shim/vmlinuz",
    "share/clh-shim/initramfs.cpio.gz",
    CONFIG,
];

/// One payload file: its path relative to the payload root and whether it
/// is executable (installed 0755, else 0644).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    pub relative: PathBuf,
    pub executable: bool,
}

#[derive(Debug)]
pub struct Payload {
    pub root: PathBuf,
    pub files: Vec<PayloadFile>,
}

impl Payload {
    /// Lists the payload at `root` (regular files only, sorted), checking
    /// that everything a pod needs is there.
    pub fn load(root: &Path) -> Result<Payload> {
        let mut files = Vec::new();
        walk(root, Path::new(""), &mut files)?;
        files.sort_by(|a, b| a.relative.cmp(&b.relative));
        for required in REQUIRED {
            if !files.iter().any(|f| f.relative == Path::new(required)) {
                return Err(InstallError::Payload {
                    root: root.to_path_buf(),
                    missing: (*required).to_owned(),
                });
            }
        }
        Ok(Payload {
            root: root.to_path_buf(),
            files,
        })
    }

    pub fn has(&self, relative: &str) -> bool {
        self.files.iter().any(|f| f.relative == Path::new(relative))
    }

    /// The version id: a sha256 over every file (path, mode, bytes), the
    /// shim configuration the installer will write, and the prefix, cut to
    /// 16 hex digits. The same payload installed twice is the same version;
    /// any change, a configuration included, is a new one.
    pub fn version_id(&self, config_input: &[u8], prefix: &Path) -> Result<String> {
        let mut h = Sha256::new();
        for f in &self.files {
            if f.relative == Path::new(CONFIG) {
                continue;
            }
            h.update(f.relative.as_os_str().as_encoded_bytes());
            h.update([0, u8::from(f.executable)]);
            fsutil::hash_file(&mut h, &self.root.join(&f.relative))?;
        }
        h.update(b"\0config\0");
        h.update(config_input);
        h.update(b"\0prefix\0");
        h.update(prefix.as_os_str().as_encoded_bytes());
        Ok(fsutil::hex(&h.finalize())[..16].to_owned())
    }
}

fn walk(root: &Path, relative: &Path, out: &mut Vec<PayloadFile>) -> Result<()> {
    let dir = root.join(relative);
    let entries = fs::read_dir(&dir).map_err(io("listing the payload", &dir))?;
    for entry in entries {
        let entry = entry.map_err(io("listing the payload", &dir))?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            // The installer's own markers (a version's `.complete`), when
            // an installed version is used as a payload.
            continue;
        }
        let rel = relative.join(entry.file_name());
        // symlink_metadata: a payload symlink is neither followed nor copied.
        let meta = fs::symlink_metadata(entry.path()).map_err(io("reading", &entry.path()))?;
        if meta.is_dir() {
            walk(root, &rel, out)?;
        } else if meta.is_file() {
            out.push(PayloadFile {
                relative: rel,
                executable: meta.permissions().mode() & 0o111 != 0,
            });
        }
    }
    Ok(())
}
