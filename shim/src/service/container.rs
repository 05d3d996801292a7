//! One container: its VM, its agent connection, and its processes (init
//! is exec id ""), each with an exit cell that a waiter task fills.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use clh_agent_client::connect_hybrid_vsock;
use clh_agent_protocol::{AgentClient, VersionRequest, AGENT_VSOCK_PORT, PROTOCOL_VERSION};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ttrpc::r#async::transport::Socket;

use super::binds::Binds;
use super::error::{agent_error, Error, Result};
use super::sandbox::Sandbox;
use super::stdio::{Pumps, StdioPaths};
use super::volume_sync::VolumeSync;
use crate::pod::Role;
use crate::sizing::PodLimits;

/// Deadline of an ordinary agent call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one round of a long poll (WaitProcess, GetOomEvent); the
/// poll is repeated after a timeout.
pub const LONG_POLL: Duration = Duration::from_secs(3600);
/// How long a process's output may take to drain after its exit.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
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
    pub sandbox: Arc<Sandbox>,
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
        sandbox: &Arc<Sandbox>,
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
            sandbox: sandbox.clone(),
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
        self.id == self.sandbox.id
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

/// A second, raw ttrpc connection to the agent for the container calls
/// (the typed client in clh-agent-client does not have them yet).
pub async fn connect_agent(uds: &Path) -> anyhow::Result<AgentClient> {
    let stream = connect_hybrid_vsock(uds, AGENT_VSOCK_PORT, CALL_TIMEOUT)
        .await
        .context("cannot connect to the agent")?;
    let client = AgentClient::new(ttrpc::r#async::Client::new(Socket::from(stream)));
    let req = VersionRequest {
        protocol_version: PROTOCOL_VERSION,
        shim_version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    let reply = client
        .version(ctx(CALL_TIMEOUT), &req)
        .await
        .context("agent Version")?;
    if reply.protocol_version != PROTOCOL_VERSION {
        anyhow::bail!(
            "the guest agent speaks protocol version {} but this shim speaks {PROTOCOL_VERSION}",
            reply.protocol_version
        );
    }
    Ok(client)
}

pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// Long-polls WaitProcess until the process exits; a broken connection
/// (the VM is gone) is reported as an error.
pub async fn wait_process(agent: &AgentClient, cid: &str, exec_id: &str) -> Result<Exit> {
    let req = clh_agent_protocol::ProcessRequest {
        container_id: cid.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    loop {
        match agent.wait_process(ctx(LONG_POLL), &req).await {
            Ok(r) => {
                return Ok(Exit {
                    status: r.exit_status,
                    at_ns: r.exited_at_ns,
                })
            }
            Err(ttrpc::Error::LocalClosed) | Err(ttrpc::Error::RemoteClosed) => {
                return Err(Error::Internal(anyhow::anyhow!(
                    "the agent connection closed"
                )))
            }
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::DEADLINE_EXCEEDED => {}
            Err(e) => return Err(agent_error("WaitProcess", e)),
        }
    }
}
