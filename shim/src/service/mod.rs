//! The Task service without ttrpc: context-free async methods that
//! `task.rs` adapts. One VM per container (standalone `ctr run`).

mod container;
pub mod error;
pub mod events;
mod oom;
mod ops;
mod rootfs;
pub mod stats;
mod stdio;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, StartRequest,
    StartResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;
use tokio::sync::watch;

use container::{ctx, Container, Exit, Process, Status, CALL_TIMEOUT, DRAIN_TIMEOUT};
pub use error::{Error, Result};
use events::{Event, EventSender};
use stats::CgroupVersion;
use stdio::StdioPaths;

use crate::vm::{PodVm, VmOptions};

pub struct ServiceConfig {
    pub state_dir: PathBuf,
    pub vm: VmOptions,
    pub cgroup: CgroupVersion,
}

pub struct TaskService<E: EventSender> {
    config: ServiceConfig,
    events: Arc<E>,
    containers: tokio::sync::Mutex<HashMap<String, Arc<Container>>>,
    exit: Arc<ExitSignal>,
}

impl<E: EventSender> TaskService<E> {
    pub fn new(config: ServiceConfig, events: E, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            config,
            events: Arc::new(events),
            containers: tokio::sync::Mutex::new(HashMap::new()),
            exit,
        }
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

    pub async fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        validate::id("container", &req.id)?;
        validate::runtime_options(req.options.as_ref())?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring from a checkpoint is not supported".into(),
            ));
        }
        let mut spec = validate::read_spec(Path::new(&req.bundle))?;
        // Before rewrite_root replaces it with the guest path.
        let source = rootfs::source_dir(&spec, Path::new(&req.bundle));
        rootfs::check_source(&req.rootfs, &source)?;
        validate::rewrite_root(&mut spec, &req.id)?;
        let mut containers = self.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        let vm = PodVm::start(&req.id, &self.config.state_dir, &self.config.vm)
            .await
            .map_err(Error::Internal)?;
        let rootfs = rootfs::host_path(vm.dir(), &req.id);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = create_in(&vm, &req, &spec, (&source, &rootfs), &stdio).await;
        let (agent, pid, pumps) = match created {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(u) = rootfs::unmount(&rootfs) {
                    tracing::error!(error = %u, "after a failed create");
                }
                if let Err(s) = vm.stop().await {
                    tracing::error!(
                        error = format!("{s:#}"),
                        "stopping the VM after a failed create"
                    );
                }
                return Err(e);
            }
        };
        let vsock = vm.vsock_socket();
        let vm = Arc::new(vm);
        let (dead_tx, vm_dead) = watch::channel(false);
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs,
            vsock,
            agent,
            vm: Mutex::new(Some(vm.clone())),
            vm_dead,
            procs: Mutex::new(HashMap::from([(
                String::new(),
                Process::new(pid, stdio, pumps),
            )])),
            tasks: Mutex::new(Vec::new()),
            oom_published: Default::default(),
        });
        let id = req.id.clone();
        c.track(tokio::spawn(async move {
            let how = vm.wait_exit().await;
            tracing::warn!(id, how, "the VMM exited");
            let _ = dead_tx.send(true);
        }));
        c.track(tokio::spawn(oom::oom_loop(c.clone(), self.events.clone())));
        containers.insert(req.id.clone(), c);
        drop(containers);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            },
        )
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
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
        let preq = clh_agent_protocol::ProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        let reply = c
            .agent
            .start_process(ctx(CALL_TIMEOUT), &preq)
            .await
            .map_err(|e| error::agent_error("StartProcess", e))?;
        c.with_proc(&req.exec_id, |p| {
            p.pid = reply.pid;
            p.status = Status::Running;
        })?;
        c.track(tokio::spawn(waiter(
            c.clone(),
            req.exec_id.clone(),
            self.events.clone(),
        )));
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid: reply.pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, ev).await;
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: reply.pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, ev)
                .await;
        }
        Ok(StartResponse {
            pid: reply.pid,
            ..Default::default()
        })
    }

    pub async fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let c = self.container(&req.id).await?;
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
            self.teardown(&c).await?;
            self.containers.lock().await.remove(&req.id);
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

    /// Removes the container in the guest, unmounts its rootfs (before the
    /// VM directory is removed), and stops the VM.
    async fn teardown(&self, c: &Container) -> Result<()> {
        if !*c.vm_dead.borrow() {
            let req = clh_agent_protocol::ContainerRequest {
                container_id: c.id.clone(),
                ..Default::default()
            };
            if let Err(e) = c.agent.remove_container(ctx(CALL_TIMEOUT), &req).await {
                tracing::warn!(id = %c.id, error = %e, "agent RemoveContainer");
            }
        }
        let vm = c.take_vm().await;
        rootfs::unmount(&c.rootfs)?;
        if let Some(vm) = vm {
            vm.stop().await.map_err(Error::Internal)?;
        }
        Ok(())
    }

    /// Ends the shim once it has nothing left to serve.
    pub async fn shutdown(&self) -> Result<()> {
        let left: Vec<_> = self.containers.lock().await.values().cloned().collect();
        if !left.is_empty() {
            return Ok(());
        }
        self.exit.signal();
        Ok(())
    }

    /// Stops every VM: the shim is going away.
    pub async fn teardown_all(&self) {
        let all: Vec<_> = self.containers.lock().await.drain().collect();
        for (id, c) in all {
            if let Err(e) = self.teardown(&c).await {
                tracing::error!(id, error = %e, "teardown");
            }
        }
    }
}

/// Creates the container in the VM: rootfs, CreateContainer, stdio.
async fn create_in(
    vm: &PodVm,
    req: &CreateTaskRequest,
    spec: &serde_json::Value,
    (source, rootfs): (&Path, &Path),
    stdio: &StdioPaths,
) -> Result<(clh_agent_protocol::AgentClient, u32, stdio::Pumps)> {
    rootfs::mount(&req.rootfs, source, rootfs).await?;
    let agent = container::connect_agent(&vm.vsock_socket()).await?;
    let creq = clh_agent_protocol::CreateContainerRequest {
        container_id: req.id.clone(),
        oci_spec: serde_json::to_vec(spec).context("serializing the OCI spec")?,
        stdio: MessageField::some(stdio.wire()),
        ..Default::default()
    };
    let reply = agent
        .create_container(ctx(CALL_TIMEOUT), &creq)
        .await
        .map_err(|e| error::agent_error("CreateContainer", e))?;
    let pumps = stdio::attach(&vm.vsock_socket(), &req.id, "", stdio).await?;
    Ok((agent, reply.pid, pumps))
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

/// Waits for a process's exit (or the VM's death), lets its output drain,
/// records the exit and publishes TaskExit.
async fn waiter<E: EventSender>(c: Arc<Container>, exec_id: String, events: Arc<E>) {
    let mut dead = c.vm_dead.clone();
    let exit = tokio::select! {
        r = container::wait_process(&c.agent, &c.id, &exec_id) => match r {
            Ok(exit) => exit,
            Err(e) => {
                tracing::warn!(id = %c.id, exec_id, error = %e, "lost the process");
                Exit::now(container::VM_DIED_STATUS)
            }
        },
        _ = dead.wait_for(|d| *d) => Exit::now(container::VM_DIED_STATUS),
    };
    let mut pumps = match c.with_proc(&exec_id, |p| std::mem::take(&mut p.pumps)) {
        Ok(p) => p,
        Err(_) => return,
    };
    pumps.drain(DRAIN_TIMEOUT).await;
    oom::publish_new_kills(&c, &*events).await;
    let Ok(pid) = c.with_proc(&exec_id, |p| {
        p.status = Status::Stopped;
        p.exit.send_replace(Some(exit));
        p.pid
    }) else {
        return;
    };
    let id = if exec_id.is_empty() {
        c.id.clone()
    } else {
        exec_id
    };
    let ev = TaskExit {
        container_id: c.id.clone(),
        id,
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(exit.timestamp()),
        ..Default::default()
    };
    publish(&*events, topics::TASK_EXIT_EVENT_TOPIC, ev).await;
}
