//! The Task service without ttrpc: context-free async methods that
//! `task.rs` adapts. One VM per pod sandbox, shared by the pod's
//! containers; one VM per standalone container (`ctr run`).

mod bind_options;
mod binds;
mod container;
mod create;
pub mod error;
pub mod events;
#[cfg(test)]
mod fakes;
mod guest_spec;
mod guest_writable;
mod oom;
mod ops;
mod pause;
mod pod_spec;
mod rootfs;
#[cfg(test)]
mod start_tests;
pub mod stats;
mod stdio;
mod sysctls;
#[cfg(test)]
mod tests;
pub mod validate;
pub mod volume_sync;

#[doc(hidden)]
pub use guest_spec::guest_spec;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{DeleteRequest, DeleteResponse, StartRequest, StartResponse};
use containerd_shim_protos::events::task::{TaskDelete, TaskExecStarted, TaskExit, TaskStart};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;

use container::{Container, Exit, Status};
pub use error::{Error, Result};
use events::{Event, EventSender};
use stats::CgroupVersion;
use stdio::DrainBounds;

use crate::shared_mount::remove_container_dir;
use crate::sizing::SizingPolicy;
use crate::vm::VmOptions;

pub struct ServiceConfig {
    pub state_dir: PathBuf,
    pub vm: VmOptions,
    pub cgroup: CgroupVersion,
    /// How VMs are sized from a pod's (or container's) limits.
    pub sizing: SizingPolicy,
}

/// The containers this shim serves, by id.
type Containers = tokio::sync::Mutex<HashMap<String, Arc<Container>>>;

pub struct TaskService<E: EventSender> {
    config: ServiceConfig,
    events: Arc<E>,
    /// Shared with each VM's OOM watcher (oom.rs).
    containers: Arc<Containers>,
    /// Ids being created: a second Create of one is refused at once rather
    /// than booting a second VM.
    creating: Mutex<HashSet<String>>,
    /// Ids deleted while being created (containerd gave up on the Create,
    /// e.g. as it shut down): the Create undoes its work when it ends
    /// instead of leaving a container nobody will delete (REL-CTRD-02).
    abandoned: Mutex<HashSet<String>>,
    exit: Arc<ExitSignal>,
}

/// Holds a container id in [`TaskService::creating`] until dropped.
struct Reservation<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        locked(self.set).remove(&self.id);
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<E: EventSender> TaskService<E> {
    pub fn new(config: ServiceConfig, events: E, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            config,
            events: Arc::new(events),
            containers: Arc::default(),
            creating: Mutex::default(),
            abandoned: Mutex::default(),
            exit,
        }
    }

    /// Waits, at most `within`, for containerd to take every queued event.
    pub async fn flush_events(&self, within: std::time::Duration) {
        self.events.flush(within).await;
    }

    async fn publish(&self, topic: &'static str, message: impl protobuf::MessageDyn) {
        publish(&*self.events, topic, message).await;
    }

    async fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    async fn reserve(&self, id: &str) -> Result<Reservation<'_>> {
        let containers = self.containers.lock().await;
        // A Create that failed after its Delete leaves its id here.
        locked(&self.abandoned).remove(id);
        let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if containers.contains_key(id) || !creating.insert(id.to_string()) {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        Ok(Reservation {
            set: &self.creating,
            id: id.to_string(),
        })
    }

    pub async fn start(&self, req: StartRequest) -> Result<StartResponse> {
        let c = self.container(&req.id).await?;
        let status = c.with_proc(&req.exec_id, |p| p.status)?;
        if status != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "process {:?} of {} is {status:?}, not created",
                req.exec_id, req.id
            )));
        }
        let pid = if c.is_pause() && req.exec_id.is_empty() {
            let pid = c.vm.vmm_pid();
            c.with_proc("", |p| p.status = Status::Running)?;
            c.track(tokio::spawn(pause::watch_vm(
                c.clone(),
                self.events.clone(),
                self.containers.clone(),
            )));
            pid
        } else {
            let pid = c.vm.agent().start_process(&req.id, &req.exec_id).await?;
            c.with_proc(&req.exec_id, |p| {
                p.pid = pid;
                p.status = Status::Running;
            })?;
            c.track(tokio::spawn(waiter(
                c.clone(),
                req.exec_id.clone(),
                self.events.clone(),
            )));
            pid
        };
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, ev).await;
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, ev)
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    pub async fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let c = {
            let containers = self.containers.lock().await;
            match containers.get(&req.id) {
                Some(c) => c.clone(),
                None => {
                    if req.exec_id.is_empty() && locked(&self.creating).contains(&req.id) {
                        tracing::warn!(id = %req.id, "deleted while being created: the Create will undo itself");
                        locked(&self.abandoned).insert(req.id.clone());
                    }
                    return Err(Error::NotFound(format!("container {} not found", req.id)));
                }
            }
        };
        let (pid, status, exit) = c.with_proc(&req.exec_id, |p| (p.pid, p.status, p.exited()))?;
        if matches!(status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "process {:?} of {} is still running",
                req.exec_id, req.id
            )));
        }
        let exit = exit.unwrap_or_else(|| Exit::now(0));
        if !req.exec_id.is_empty() {
            if let Some(mut p) = c.procs().remove(&req.exec_id) {
                p.pumps.abort();
            }
        } else {
            if c.owns_vm() {
                self.teardown_members(&c).await;
            }
            let torn = self.teardown(&c).await;
            self.containers.lock().await.remove(&req.id);
            torn?;
            let ev = TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            };
            self.publish(topics::TASK_DELETE_EVENT_TOPIC, ev).await;
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    /// Makes the new container `c` known, unless it was deleted while it
    /// was being created: then it is torn down and the Create fails.
    async fn admit(&self, c: Arc<Container>) -> Result<()> {
        {
            let mut containers = self.containers.lock().await;
            if !locked(&self.abandoned).remove(&c.id) {
                containers.insert(c.id.clone(), c);
                return Ok(());
            }
        }
        if let Err(e) = self.teardown(&c).await {
            tracing::error!(id = %c.id, error = %e, "undoing an abandoned create");
        }
        Err(Error::FailedPrecondition(format!(
            "container {} was deleted while it was being created; its create was undone",
            c.id
        )))
    }

    /// Removes the container in the guest and unmounts what it had in the
    /// shared directory; for the VM's owner, then stops the VM.
    async fn teardown(&self, c: &Container) -> Result<()> {
        if c.rootfs.is_some() {
            create::remove_in_guest(&c.vm, &c.id).await;
        }
        let synced: Vec<_> = c
            .synced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for s in synced {
            s.stop().await;
        }
        c.stop_tasks().await;
        let binds = c.binds.lock().unwrap_or_else(|p| p.into_inner()).unmount();
        let rootfs = c.rootfs.as_deref().map_or(Ok(()), rootfs::unmount);
        if c.owns_vm() {
            c.vm.stop().await.map_err(Error::Internal)?;
        } else if binds.is_ok() && rootfs.is_ok() {
            if let Err(e) = remove_container_dir(c.vm.dir(), &c.id) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "removing the container's directory"
                );
            }
        }
        binds.and(rootfs)
    }

    /// Before the VM's owner goes: the containers still in its VM (a pod
    /// deleted before its containers) are torn down and forgotten.
    async fn teardown_members(&self, owner: &Container) {
        let members: Vec<Arc<Container>> = {
            let mut containers = self.containers.lock().await;
            let ids: Vec<String> = containers
                .values()
                .filter(|c| c.vm.id() == owner.id && c.id != owner.id)
                .map(|c| c.id.clone())
                .collect();
            ids.iter().filter_map(|id| containers.remove(id)).collect()
        };
        for c in members {
            tracing::warn!(id = %c.id, pod = %owner.id, "the pod sandbox is deleted before this container");
            if let Err(e) = self.teardown(&c).await {
                tracing::error!(id = %c.id, error = %e, "teardown");
            }
        }
    }

    /// Ends the shim once it has nothing left to serve.
    pub async fn shutdown(&self) -> Result<()> {
        if !self.containers.lock().await.is_empty() {
            return Ok(());
        }
        self.exit.signal();
        Ok(())
    }

    /// Stops every VM: the shim is going away. Pod containers first, then
    /// the VMs' owners.
    pub async fn teardown_all(&self) {
        let mut all: Vec<_> = self
            .containers
            .lock()
            .await
            .drain()
            .map(|(_, c)| c)
            .collect();
        all.sort_by_key(|c| c.owns_vm());
        for c in all {
            if let Err(e) = self.teardown(&c).await {
                tracing::error!(id = %c.id, error = %e, "teardown");
            }
        }
    }
}

async fn publish<E: EventSender>(
    events: &E,
    topic: &'static str,
    message: impl protobuf::MessageDyn,
) {
    events
        .send(Event {
            topic,
            message: Box::new(message),
        })
        .await;
}

/// Waits for a process's exit (or the VM's death), lets its output drain
/// (stdio.rs: to its end, unless containerd stops reading it or it
/// outlives the process), records the exit and publishes TaskExit.
async fn waiter<E: EventSender>(c: Arc<Container>, exec_id: String, events: Arc<E>) {
    let (exit, bounds) = tokio::select! {
        r = container::wait_process(&c.vm, &c.id, &exec_id) => match r {
            Ok(exit) => (exit, DrainBounds::EXITED),
            Err(e) => {
                tracing::warn!(id = %c.id, exec_id, error = %e, "lost the process");
                (Exit::now(container::VM_DIED_STATUS), DrainBounds::VM_GONE)
            }
        },
        _ = c.vm.died() => (Exit::now(container::VM_DIED_STATUS), DrainBounds::VM_GONE),
    };
    let mut pumps = match c.with_proc(&exec_id, |p| std::mem::take(&mut p.pumps)) {
        Ok(p) => p,
        Err(_) => return,
    };
    pumps.drain(bounds).await;
    // A stream still open (a process left behind holds it) is copied on
    // until the process is deleted, which aborts it.
    let mut left = Some(pumps);
    let _ = c.with_proc(&exec_id, |p| p.pumps = left.take().unwrap_or_default());
    if let Some(mut pumps) = left {
        pumps.abort();
    }
    oom::publish_new_kills(&c, &*events).await;
    finish(&c, &exec_id, exit, &*events).await;
}

/// Records a process's exit (once) and publishes TaskExit.
async fn finish<E: EventSender>(c: &Container, exec_id: &str, exit: Exit, events: &E) {
    let Ok(Some(pid)) = c.with_proc(exec_id, |p| {
        if p.status == Status::Stopped {
            return None;
        }
        p.status = Status::Stopped;
        p.exit.send_replace(Some(exit));
        Some(p.pid)
    }) else {
        return;
    };
    let id = if exec_id.is_empty() {
        c.id.clone()
    } else {
        exec_id.to_string()
    };
    let ev = TaskExit {
        container_id: c.id.clone(),
        id,
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(exit.timestamp()),
        ..Default::default()
    };
    publish(events, topics::TASK_EXIT_EVENT_TOPIC, ev).await;
}
