//! Containers in the guest, run with youki's libcontainer.
//!
//! The registry maps container ids to their state. Locks are std mutexes
//! held only for map look-ups; libcontainer's blocking calls run on the
//! blocking pool, and waiting for an exit goes through each process's
//! watch channel, so no lock is ever held across an await.

mod cgroup;
mod exec_seccomp;
mod executor;
mod kernel_fs_targets;
mod lifecycle;
pub mod process;
mod tty;
mod unheard;

pub(crate) use cgroup::resource_writes;
pub(crate) use lifecycle::{ephemeral_dirs, prepare_process, prepare_spec, validate_id};

use crate::reaper::Reaper;
use libcontainer::container::Container;
use process::Proc;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

pub use cgroup::Stats;

/// libcontainer's state directory (one subdirectory per container).
const STATE_ROOT: &str = "/run/clh/youki";
/// Our bundles: config.json and exec process specs.
const BUNDLE_ROOT: &str = "/run/clh/containers";
/// The cgroup v2 mount and the parent of every container's cgroup; the
/// guest is ours, so whatever cgroupsPath the host chose is replaced.
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
const CGROUP_PARENT: &str = "clh";

/// What went wrong, by the ttrpc code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CtrError {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {exec:?} of container {container:?} not found")]
    ProcessNotFound { container: String, exec: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// What failed, and why: the cause's own chain is kept, and the
    /// status the shim gets spells it out (service.rs).
    #[error("{what}")]
    Internal {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl CtrError {
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Self::NotFound(_) | Self::ProcessNotFound { .. } => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Internal { .. } => Code::INTERNAL,
        }
    }

    /// An internal error saying what we were doing.
    fn internal(
        what: impl std::fmt::Display,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Internal {
            what: what.to_string(),
            source: Some(e.into()),
        }
    }
}

pub type Result<T, E = CtrError> = std::result::Result<T, E>;

/// An exec registered by ExecProcess, started by StartProcess.
struct PendingExec {
    spec_path: PathBuf,
    stdio: process::ChildStdio,
    terminal: bool,
    /// The container's seccomp filter, when it has one.
    seccomp: Option<exec_seccomp::FilteredExec>,
}

struct Entry {
    id: String,
    container: Mutex<Container>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    pending: Mutex<HashMap<String, PendingExec>>,
    bundle: PathBuf,
    /// The spec's seccomp filter, for its execs (see `exec_seccomp`).
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

impl Entry {
    fn cgroup_dir(&self) -> PathBuf {
        cgroup_dir(&self.id)
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| CtrError::ProcessNotFound {
                container: self.id.clone(),
                exec: exec_id.to_owned(),
            })
    }
}

fn cgroup_dir(id: &str) -> PathBuf {
    PathBuf::from(CGROUP_MOUNT).join(CGROUP_PARENT).join(id)
}

/// The agent's containers. Cheap to clone.
#[derive(Clone)]
pub struct Containers {
    map: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
    reaper: Reaper,
    /// Serializes libcontainer builds: each forks from this multi-threaded
    /// process, and one at a time keeps that window small.
    build_lock: Arc<tokio::sync::Mutex<()>>,
    /// Ids being created, and whether a removal came for one meanwhile
    /// (`unheard`). Locked before `map` when both are.
    creating: Arc<Mutex<HashMap<String, bool>>>,
    oom: Arc<cgroup::OomWatch>,
}

impl Containers {
    pub fn new(reaper: Reaper) -> Self {
        Self {
            map: Arc::default(),
            reaper,
            build_lock: Arc::default(),
            creating: Arc::default(),
            oom: Arc::new(cgroup::OomWatch::default()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| CtrError::NotFound(id.to_owned()))
    }

    /// The process (container_id, exec_id).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>> {
        self.get(id)?.process(exec_id)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<process::Exit> {
        let proc = self.process(id, exec_id)?;
        Ok(proc.wait().await)
    }

    pub fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let proc = self.process(id, exec_id)?;
        match proc.resize(width, height) {
            Ok(true) => Ok(()),
            Ok(false) => Err(CtrError::FailedPrecondition(format!(
                "process {exec_id:?} of {id:?} has no terminal"
            ))),
            Err(e) => Err(CtrError::internal("resizing the terminal", e)),
        }
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?.close_stdin();
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<Stats> {
        let entry = self.get(id)?;
        cgroup::stats(&entry.cgroup_dir()).map_err(|e| CtrError::internal("reading stats", e))
    }

    pub fn list_pids(&self, id: &str) -> Result<Vec<u32>> {
        let entry = self.get(id)?;
        cgroup::pids(&entry.cgroup_dir()).map_err(|e| CtrError::internal("listing pids", e))
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let entry = self.get(id)?;
        let resources = parse_resources(resources_json)?;
        cgroup::update(&entry.cgroup_dir(), &resources)
            .map_err(|e| CtrError::internal("applying resources", e))
    }

    pub fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let entry = self.get(id)?;
        cgroup::freeze(&entry.cgroup_dir(), frozen)
            .map_err(|e| CtrError::internal(if frozen { "pausing" } else { "resuming" }, e))
    }

    /// The next OOM kill in any container (long poll).
    pub async fn next_oom(&self) -> String {
        self.oom.next().await
    }

    /// Starts the OOM watcher (in the guest only).
    pub fn watch_oom(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(cgroup::OOM_POLL).await;
                let ids: Vec<String> = lock(&this.map).keys().cloned().collect();
                this.oom.poll(&ids, cgroup_dir);
            }
        });
    }
}

/// UpdateContainer's resources: OCI LinuxResources as JSON.
pub(crate) fn parse_resources(json: &[u8]) -> Result<oci_spec::runtime::LinuxResources> {
    serde_json::from_slice(json)
        .map_err(|e| CtrError::InvalidArgument(format!("bad LinuxResources JSON: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
