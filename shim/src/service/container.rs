//! One container: its VM, its agent connection, and its processes (init
//! is exec id ""), each with an exit cell that a waiter task fills.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::binds::Binds;
use super::error::{Error, Result};
use super::stdio::{Pumps, StdioPaths};
use super::volume_sync::VolumeSync;
use crate::pod::Role;
use crate::sizing::PodLimits;
use crate::vm::PodVm;

/// Exit status reported when the VM died under a process.
pub const VM_DIED_STATUS: u32 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at_ns: i64,
}

impl Exit {
    pub fn now(status: u32) -> Self {
        let at_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or_default();
        Exit { status, at_ns }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.at_ns.div_euclid(1_000_000_000),
            nanos: i32::try_from(self.at_ns.rem_euclid(1_000_000_000)).unwrap_or_default(),
            ..Default::default()
        }
    }
}

pub struct Process {
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub pumps: Pumps,
    pub exit: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(pid: u32, stdio: StdioPaths, pumps: Pumps) -> Self {
        Process {
            pid,
            status: Status::Created,
            stdio,
            pumps,
            exit: watch::channel(None).0,
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

pub struct Container {
    pub id: String,
    pub bundle: String,
    pub role: Role,
    /// The rootfs mount in the VM's shared directory; none for a pod's
    /// pause container, which runs nothing in the guest.
    pub rootfs: Option<PathBuf>,
    /// The spec's bind mounts, shared with the guest.
    pub binds: Mutex<Binds>,
    /// The VM it runs in: its agent, vsock socket and death watch.
    pub vm: Arc<PodVm>,
    pub procs: Mutex<HashMap<String, Process>>,
    /// The waiters; aborted at teardown.
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
    /// OOM kills already published as TaskOOM (see oom.rs).
    pub oom_published: std::sync::atomic::AtomicU64,
    /// The container's CPU and memory limits, which the VM's size covers.
    pub limits: Mutex<PodLimits>,
    /// Its ConfigMap, Secret, projected and downward-API volumes, copied
    /// into the guest and kept current (volume_sync.rs).
    pub synced: Mutex<Vec<VolumeSync>>,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: &str,
        role: Role,
        vm: &Arc<PodVm>,
        rootfs: Option<PathBuf>,
        binds: Binds,
        init: Process,
    ) -> Self {
        Container {
            id: id.to_string(),
            bundle: bundle.to_string(),
            role,
            rootfs,
            binds: Mutex::new(binds),
            vm: vm.clone(),
            procs: Mutex::new(HashMap::from([(String::new(), init)])),
            tasks: Mutex::new(Vec::new()),
            oom_published: Default::default(),
            limits: Mutex::default(),
            synced: Mutex::default(),
        }
    }

    /// The pod's pause container: a stand-in process, nothing in the guest.
    pub fn is_pause(&self) -> bool {
        self.role == Role::Sandbox
    }

    /// Whether this container's Delete stops the VM.
    pub fn owns_vm(&self) -> bool {
        self.id == self.vm.id()
    }

    pub fn procs(&self) -> MutexGuard<'_, HashMap<String, Process>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn track(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    pub fn with_proc<T>(&self, exec_id: &str, f: impl FnOnce(&mut Process) -> T) -> Result<T> {
        let mut procs = self.procs();
        let p = procs.get_mut(exec_id).ok_or_else(|| {
            Error::NotFound(format!(
                "process {exec_id:?} of container {} not found",
                self.id
            ))
        })?;
        Ok(f(p))
    }

    /// Aborts the waiters and the stdio pumps.
    pub async fn stop_tasks(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        for p in self.procs().values_mut() {
            p.pumps.abort();
        }
    }
}

/// Waits for the process's exit (the agent's WaitProcess long poll); a
/// broken connection (the VM is gone) is an error.
pub async fn wait_process(vm: &PodVm, cid: &str, exec_id: &str) -> Result<Exit> {
    let reply = vm.agent().wait_process(cid, exec_id).await?;
    Ok(Exit {
        status: reply.exit_status,
        at_ns: reply.exited_at_ns,
    })
}
