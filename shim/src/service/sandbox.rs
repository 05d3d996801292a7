//! One VM and what watches it: the agent connection shared by every
//! container in the VM, the VMM-exit monitor and the OOM event loop.
//!
//! A standalone container (`ctr run`) owns a sandbox of its own id; a pod's
//! sandbox is owned by its pause container, and its other containers join
//! it. The owner's Delete stops the VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use clh_agent_protocol::AgentClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::container::{connect_agent, ctx, Container, CALL_TIMEOUT, LONG_POLL};
use super::error::{Error, Result};
use super::events::EventSender;
use super::oom;
use super::writable_shares::WritableShares;
use crate::pod_cgroup::{CgroupError, PodCgroup};
use crate::vm::{PodVm, VmOptions};
use clh_hypervisor::VmSize;

pub struct Sandbox {
    pub id: String,
    /// The VM's state directory (`<state_dir>/<id>`).
    pub dir: PathBuf,
    pub vsock: PathBuf,
    pub agent: AgentClient,
    /// Turns true when the VMM has exited.
    pub vm_dead: watch::Receiver<bool>,
    /// Host paths the guest can write through virtio-fs: never synced.
    pub writable: Arc<WritableShares>,
    vm: Mutex<Option<Arc<PodVm>>>,
    /// The VM's current size.
    size: Mutex<VmSize>,
    /// The host cgroup holding the VMM, its helpers and virtiofsd.
    cgroup: Mutex<Option<PodCgroup>>,
    /// The containers in this VM, for the OOM loop.
    members: Mutex<HashMap<String, Weak<Container>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop_timeout: Duration,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sandbox {
    /// Boots the VM, moves its host processes into the host cgroup
    /// `cgroups_path` (when given) and connects to the agent; on failure
    /// nothing is left.
    pub async fn boot<E: EventSender>(
        id: &str,
        state_dir: &Path,
        opts: &VmOptions,
        cgroups_path: Option<&str>,
        events: Arc<E>,
    ) -> Result<Arc<Sandbox>> {
        let mut cgroup = match cgroups_path.filter(|p| !p.is_empty()) {
            Some(path) => Some(PodCgroup::create(path).map_err(cgroup_error)?),
            None => None,
        };
        let vm = match PodVm::start(id, state_dir, opts).await {
            Ok(vm) => vm,
            Err(e) => {
                destroy_cgroup(cgroup.take(), opts.stop_timeout).await;
                return Err(Error::Internal(e));
            }
        };
        let vsock = vm.vsock_socket();
        let joined = match cgroup.as_mut() {
            Some(cg) => with_descendants(vm.pids())
                .into_iter()
                .try_for_each(|pid| cg.add_process(pid)),
            None => Ok(()),
        };
        let agent = match joined.map_err(cgroup_error) {
            Ok(()) => connect_agent(&vsock).await.map_err(Error::Internal),
            Err(e) => Err(e),
        };
        let agent = match agent {
            Ok(agent) => agent,
            Err(e) => {
                if let Err(s) = vm.stop().await {
                    tracing::error!(error = format!("{s:#}"), "stopping the VM");
                }
                destroy_cgroup(cgroup.take(), opts.stop_timeout).await;
                return Err(e);
            }
        };
        let vm = Arc::new(vm);
        let (dead_tx, vm_dead) = watch::channel(false);
        let sandbox = Arc::new(Sandbox {
            id: id.to_string(),
            dir: vm.dir().to_path_buf(),
            vsock,
            agent,
            vm_dead,
            writable: Arc::default(),
            vm: Mutex::new(Some(vm.clone())),
            size: Mutex::new(VmSize {
                vcpus: opts.vcpus,
                memory_mib: opts.memory_mib,
            }),
            cgroup: Mutex::new(cgroup),
            stop_timeout: opts.stop_timeout,
            members: Mutex::default(),
            tasks: Mutex::default(),
        });
        let sid = id.to_string();
        sandbox.track(tokio::spawn(async move {
            let how = vm.wait_exit().await;
            tracing::warn!(id = sid, how, "the VMM exited");
            let _ = dead_tx.send(true);
        }));
        let weak = Arc::downgrade(&sandbox);
        sandbox.track(tokio::spawn(oom_loop(weak, events)));
        Ok(sandbox)
    }

    fn track(&self, task: JoinHandle<()>) {
        locked(&self.tasks).push(task);
    }

    pub fn join(&self, c: &Arc<Container>) {
        locked(&self.members).insert(c.id.clone(), Arc::downgrade(c));
    }

    pub fn leave(&self, id: &str) {
        locked(&self.members).remove(id);
    }

    fn member(&self, id: &str) -> Option<Arc<Container>> {
        locked(&self.members).get(id).and_then(Weak::upgrade)
    }

    /// The pids of the VMM, its helpers and virtiofsd.
    pub fn pids(&self) -> Vec<u32> {
        locked(&self.vm)
            .as_ref()
            .map(|vm| vm.pids())
            .unwrap_or_default()
    }

    /// The VMM's pid, which stands for the pod's pause process.
    pub fn vmm_pid(&self) -> u32 {
        self.pids().first().copied().unwrap_or_default()
    }

    pub fn size(&self) -> VmSize {
        *locked(&self.size)
    }

    /// Grows the VM to `target`. A backend that cannot (QEMU) leaves the VM
    /// as it is: the containers' limits still hold in the guest, they just
    /// compete for less.
    pub async fn grow(&self, target: VmSize) -> Result<()> {
        let vm = locked(&self.vm).clone();
        let Some(vm) = vm else {
            return Ok(());
        };
        match vm.resize(target).await {
            Ok(now) => {
                tracing::info!(pod = %self.id, vcpus = now.vcpus, memory_mib = now.memory_mib, "VM resized");
                *locked(&self.size) = now;
                // Linux leaves hot-added CPUs offline; the agent onlines them.
                let online = self
                    .agent
                    .online_resources(ctx(CALL_TIMEOUT), &clh_agent_protocol::Empty::default())
                    .await;
                online.map_err(|e| super::error::agent_error("OnlineResources", e))?;
                Ok(())
            }
            Err(clh_hypervisor::Error::Unsupported(what)) => {
                tracing::warn!(pod = %self.id, what, "the VM cannot grow; its containers share its current size");
                Ok(())
            }
            Err(e) => Err(Error::Internal(
                anyhow::Error::new(e).context(format!("resizing the VM of {}", self.id)),
            )),
        }
    }

    /// Stops the watchers, the VM, and removes the host cgroup. Idempotent.
    pub async fn stop(&self) -> Result<()> {
        let tasks: Vec<_> = locked(&self.tasks).drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let vm = locked(&self.vm).take();
        let stopped = match vm.map(Arc::try_unwrap) {
            None => Ok(()),
            Some(Ok(vm)) => vm.stop().await.map_err(Error::Internal),
            Some(Err(_)) => Err(Error::Internal(anyhow::anyhow!(
                "internal error: VM {} is still shared after its watchers ended",
                self.id
            ))),
        };
        let cgroup = locked(&self.cgroup).take();
        if let Some(cg) = cgroup {
            cg.destroy(self.stop_timeout).await.map_err(cgroup_error)?;
        }
        stopped
    }
}

/// `pids` and every process they forked (virtiofsd's sandboxed worker was
/// born before its parent joined the pod cgroup, so it does not follow).
fn with_descendants(pids: Vec<u32>) -> Vec<u32> {
    let mut all = Vec::new();
    let mut todo = pids;
    while let Some(pid) = todo.pop() {
        if all.contains(&pid) {
            continue;
        }
        all.push(pid);
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all
}

fn cgroup_error(e: CgroupError) -> Error {
    match e {
        CgroupError::InvalidPath { .. } | CgroupError::SystemdNotRunning { .. } => {
            Error::InvalidArgument(e.to_string())
        }
        CgroupError::InUse { .. } => Error::AlreadyExists(e.to_string()),
        other => Error::Internal(anyhow::Error::new(other)),
    }
}

async fn destroy_cgroup(cgroup: Option<PodCgroup>, timeout: Duration) {
    if let Some(cg) = cgroup {
        if let Err(e) = cg.destroy(timeout).await {
            tracing::error!(error = %e, "removing the pod cgroup after a failed start");
        }
    }
}

/// Long-polls the agent for OOM kills and publishes each new one for the
/// container it names.
async fn oom_loop<E: EventSender>(sandbox: Weak<Sandbox>, events: Arc<E>) {
    loop {
        let Some(agent) = sandbox.upgrade().map(|s| s.agent.clone()) else {
            return;
        };
        let next = agent
            .get_oom_event(ctx(LONG_POLL), &clh_agent_protocol::Empty::default())
            .await;
        match next {
            Ok(ev) => {
                let member = sandbox.upgrade().and_then(|s| s.member(&ev.container_id));
                if let Some(c) = member {
                    oom::publish_new_kills(&c, &*events).await;
                }
            }
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::DEADLINE_EXCEEDED => {}
            Err(e) => {
                tracing::debug!(error = %e, "OOM event loop ends");
                return;
            }
        }
    }
}
