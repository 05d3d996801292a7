//! clh-install: puts clh-shim on a node and takes it off again.
//!
//! `install` copies a payload (shim, guest image, helpers, configuration)
//! into a new version directory under the prefix, points `current` at it,
//! registers the `clh` runtime handler with containerd (a drop-in, or an
//! in-place table where containerd 1.x would let a drop-in wipe the node's
//! CRI settings: containerd.rs), and restarts containerd only when its
//! configuration changed. An upgrade changes no containerd configuration
//! (the handler runs the shim through `current`), so containerd keeps
//! running and so do the pods; the old version stays until no process runs
//! from it. `uninstall` restores containerd's main file byte for byte (or,
//! if an admin changed it since, takes out only what install put in) and
//! removes everything else install made. Every step is idempotent: an
//! install run twice changes nothing the second time.

mod containerd;
mod error;
mod fsutil;
mod layout;
pub mod node_label;
mod payload;
mod procs;
mod restart;
mod shim_config;
mod state;
mod steps;

use std::path::{Path, PathBuf};

pub use containerd::{parse_version_output, Major, Style};
pub use error::{InstallError, Result};
pub use restart::{Outcome, Restart};
pub use steps::{install, status, uninstall};

/// Where things go on the node; every path is as the host sees it, and is
/// reached under `host_root` (`/host` in the installer's pod).
#[derive(Debug, Clone)]
pub struct Options {
    pub host_root: PathBuf,
    pub prefix: PathBuf,
    pub containerd_config: PathBuf,
    pub drop_in_dir: PathBuf,
    /// Where a `containerd-shim-clh-v2` symlink lets `ctr --runtime
    /// io.containerd.clh.v2` find the shim on containerd's PATH; None: none.
    pub link_dir: Option<PathBuf>,
    /// The containerd major version; None: ask `containerd --version`.
    pub containerd_major: Option<Major>,
    /// The containerd binary to ask (host view); None: the usual places.
    pub containerd_binary: Option<PathBuf>,
    pub restart: Restart,
    /// The payload to install (`make node-payload`).
    pub payload: PathBuf,
    /// An admin's shim configuration to ship instead of the payload's.
    pub shim_config: Option<PathBuf>,
    /// The CRI runtime handler name.
    pub handler: String,
    /// The host's /proc (the installer's pod shares the host PID namespace).
    pub proc_dir: PathBuf,
}

impl Options {
    /// The defaults for a node, with `payload`.
    pub fn new(payload: PathBuf) -> Options {
        Options {
            host_root: "/".into(),
            prefix: "/opt/clh-shim".into(),
            containerd_config: "/etc/containerd/config.toml".into(),
            drop_in_dir: "/etc/containerd/conf.d".into(),
            link_dir: Some("/usr/local/bin".into()),
            containerd_major: None,
            containerd_binary: None,
            restart: Restart::Auto,
            payload,
            shim_config: None,
            handler: "clh".into(),
            proc_dir: "/proc".into(),
        }
    }

    /// `path` (host view) as this process reaches it.
    pub fn on_host(&self, path: &Path) -> PathBuf {
        under_root(&self.host_root, path)
    }
}

/// `path` (absolute, host view) under `root`.
pub(crate) fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// What a run did, one line each, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<String>,
    /// Whether containerd's configuration changed.
    pub containerd_config_changed: bool,
    pub restart: Option<Outcome>,
    /// The version now current (install), if any.
    pub version: Option<String>,
}

impl Report {
    fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
}
