//! The install record (`<prefix>/install-state.json`): everything install
//! changed outside the prefix, so that uninstall puts it back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{InstallError, Result};
use crate::fsutil;

pub const FILE: &str = "install-state.json";
pub const BACKUP_DIR: &str = "backup";
/// The main containerd config as it was before the first install changed it.
pub const MAIN_BACKUP: &str = "containerd-config.toml.orig";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub handler: String,
    /// The version `current` points at.
    pub version: String,
    /// containerd's main config, as the host sees it.
    pub main_config: PathBuf,
    /// Set when install first changed the main file.
    pub main_original: Option<Original>,
    /// sha256 of the main file as install last left it.
    pub main_written_sha256: Option<String>,
    pub added_runtimes: Vec<String>,
    pub added_import: bool,
    /// The drop-in install wrote (host view).
    pub drop_in: Option<PathBuf>,
    /// The shim symlink install made for `ctr --runtime` (host view).
    pub link: Option<PathBuf>,
    /// Directories install created outside the prefix, outermost first.
    pub created_dirs: Vec<PathBuf>,
}

/// The main config before install.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Original {
    /// false: there was no file (uninstall removes it).
    pub existed: bool,
    pub mode: u32,
    pub sha256: String,
}

impl State {
    pub fn load(prefix_on_host: &Path) -> Result<Option<State>> {
        let path = prefix_on_host.join(FILE);
        let Some(bytes) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| InstallError::State {
                path: path.clone(),
                message: e.to_string(),
                backup_hint: prefix_on_host
                    .join(BACKUP_DIR)
                    .join(MAIN_BACKUP)
                    .display()
                    .to_string(),
            })
    }

    pub fn save(&self, prefix_on_host: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| InstallError::State {
            path: prefix_on_host.join(FILE),
            message: e.to_string(),
            backup_hint: String::new(),
        })?;
        bytes.push(b'\n');
        fsutil::write_atomic(&prefix_on_host.join(FILE), &bytes, 0o600)
    }
}
