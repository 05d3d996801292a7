//! What can go wrong on a node, each saying what failed and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the payload at {root} has no {missing}: build it with `make node-payload` (or pass --payload DIR)")]
    Payload { root: PathBuf, missing: String },
    #[error("containerd config {path} is not valid TOML ({message}): fix it, check it with `containerd config dump`, and rerun")]
    ConfigParse { path: PathBuf, message: String },
    #[error("containerd config {path}: {problem}")]
    ConfigShape { path: PathBuf, problem: String },
    #[error("cannot tell which containerd this node runs ({0}): pass --containerd-version 1 or 2, or --containerd PATH")]
    ContainerdVersion(String),
    #[error("{} clh-shim process(es) still run from {dir} (pids {}): remove the node's clh pods first (kubectl drain), or pass --force to leave the files they use in place", pids.len(), pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))]
    InUse { dir: PathBuf, pids: Vec<u32> },
    #[error("restarting containerd with `{command}` failed ({detail}): restart it by hand so that it loads the new configuration")]
    Restart { command: String, detail: String },
    #[error("labelling the node failed: {0}")]
    Label(String),
    #[error("another clh-install holds {0} and did not finish within {1:?}: wait for it, or remove a stale holder")]
    Locked(PathBuf, std::time::Duration),
    #[error("the install record {path} is unreadable ({message}): it says what to restore on uninstall; restore it from {backup_hint} or remove the prefix by hand")]
    State {
        path: PathBuf,
        message: String,
        backup_hint: String,
    },
}

pub type Result<T> = std::result::Result<T, InstallError>;

/// `map_err` for I/O on a path: `io(what, path)`.
pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
