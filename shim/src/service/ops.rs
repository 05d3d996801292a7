//! The Task calls on a running container: state, wait, signals, exec,
//! stats, resources, pause/resume.

use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest, StateRequest,
    StateResponse, StatsRequest, StatsResponse, Status as ApiStatus, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim_protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim_protos::topics;

use super::container::{Container, Process, Status};
use super::error::{Error, Result};
use super::events::EventSender;
use super::stdio::{self, StdioPaths};
use super::{validate, TaskService};
use crate::sizing::PodLimits;

fn api_status(s: Status) -> ApiStatus {
    match s {
        Status::Created => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped => ApiStatus::STOPPED,
    }
}

/// Refuses what needs a guest process on the pod's pause container.
fn no_pause(c: &Container, what: &str) -> Result<()> {
    if c.is_pause() {
        return Err(Error::FailedPrecondition(format!(
            "cannot {what} the pause container of pod {}: it runs no process in the VM",
            c.id
        )));
    }
    Ok(())
}

impl<E: EventSender> TaskService<E> {
    pub async fn state(&self, req: StateRequest) -> Result<StateResponse> {
        let c = self.container(&req.id).await?;
        let bundle = c.bundle.clone();
        c.with_proc(&req.exec_id, |p| {
            let exit = p.exited();
            StateResponse {
                id: req.id.clone(),
                bundle,
                pid: p.pid,
                status: EnumOrUnknown::new(api_status(p.status)),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map(|e| e.status).unwrap_or_default(),
                exited_at: exit.map(|e| e.timestamp()).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }
        })
    }

    /// Resolves once the process has exited (its waiter recorded it).
    pub async fn wait(&self, req: WaitRequest) -> Result<WaitResponse> {
        let c = self.container(&req.id).await?;
        let mut rx = c.with_proc(&req.exec_id, |p| p.exit.subscribe())?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                Error::NotFound(format!(
                    "process {:?} of {} was deleted",
                    req.exec_id, req.id
                ))
            })?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("exit missing")))?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    pub async fn kill(&self, req: KillRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        if c.is_pause() && req.exec_id.is_empty() {
            return super::pause::kill(&c, req.signal, &*self.events).await;
        }
        let status = c.with_proc(&req.exec_id, |p| p.status)?;
        if status == Status::Stopped {
            return Err(Error::NotFound(format!(
                "process {:?} of {} has already exited",
                req.exec_id, req.id
            )));
        }
        let agent = c.vm.agent();
        agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(())
    }

    pub async fn pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let c = self.container(&req.id).await?;
        if c.is_pause() {
            let processes = vec![ProcessInfo {
                pid: c.vm.vmm_pid(),
                ..Default::default()
            }];
            return Ok(PidsResponse {
                processes,
                ..Default::default()
            });
        }
        let pids = c.vm.agent().list_pids(&req.id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    /// Closing stdin ends the stdin stream: the agent sees EOF.
    pub async fn close_io(&self, req: CloseIORequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        if req.stdin {
            c.with_proc(&req.exec_id, |p| p.pumps.close_stdin())?;
        }
        Ok(())
    }

    pub async fn resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        let agent = c.vm.agent();
        agent
            .resize_tty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(())
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> Result<()> {
        validate::id("exec", &req.exec_id)?;
        let c = self.container(&req.id).await?;
        no_pause(&c, "exec")?;
        if c.procs().contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} already exists in {}",
                req.exec_id, req.id
            )));
        }
        let process = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<serde_json::Value>(&process)
            .map_err(|e| Error::InvalidArgument(format!("malformed exec process spec: {e}")))?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let agent = c.vm.agent();
        agent
            .exec_process(&req.id, &req.exec_id, &process, paths.wire())
            .await?;
        let pumps = stdio::attach(c.vm.vsock_socket(), &req.id, &req.exec_id, &paths)
            .await
            .map_err(Error::Internal)?;
        c.procs()
            .insert(req.exec_id.clone(), Process::new(0, paths, pumps));
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, ev).await;
        Ok(())
    }

    pub async fn stats(&self, req: StatsRequest) -> Result<StatsResponse> {
        let c = self.container(&req.id).await?;
        if c.is_pause() {
            // Nothing runs for it in the guest: an empty sample of the
            // host's cgroup format.
            let any = super::stats::to_any(&Default::default(), self.config.cgroup)
                .map_err(|e| Error::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
            return Ok(StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            });
        }
        let reply = c.vm.agent().container_stats(&req.id).await?;
        let any = super::stats::to_any(&reply, self.config.cgroup)
            .map_err(|e| Error::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    /// containerd sends the new OCI LinuxResources as JSON in an Any.
    pub async fn update(&self, req: UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        if c.is_pause() {
            // The pod's limits are its containers' (and the VM's size).
            return Ok(());
        }
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let json: serde_json::Value = if resources.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&resources).map_err(|e| {
                Error::InvalidArgument(format!("malformed resources in the update: {e}"))
            })?
        };
        let limits = PodLimits::from_linux_resources(&json)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // Grow first: a limit the VM cannot hold yet would only be a
        // promise.
        self.grow_for(&c.vm, Some((&c.id, limits))).await?;
        c.vm.agent().update_container(&req.id, &resources).await?;
        *c.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
        Ok(())
    }

    pub async fn pause(&self, req: PauseRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        no_pause(&c, "pause")?;
        c.vm.agent().pause_container(&req.id).await?;
        c.with_proc("", |p| p.status = Status::Paused)?;
        let ev = TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, ev).await;
        Ok(())
    }

    pub async fn resume(&self, req: ResumeRequest) -> Result<()> {
        let c = self.container(&req.id).await?;
        no_pause(&c, "resume")?;
        c.vm.agent().resume_container(&req.id).await?;
        c.with_proc("", |p| p.status = Status::Running)?;
        let ev = TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, ev).await;
        Ok(())
    }

    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse> {
        let c = self.container(&req.id).await?;
        let task_pid = c.with_proc("", |p| p.pid)?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }
}
