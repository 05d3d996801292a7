//! The ttrpc face of the Task service: log, call the context-free service,
//! map the error. No logic, no locks, no I/O here.

use std::sync::Arc;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::Result as TtrpcResult;

use crate::service::events::EventSender;
use crate::service::{Error, TaskService};

pub struct TaskAdapter<E: EventSender> {
    svc: Arc<TaskService<E>>,
}

impl<E: EventSender> TaskAdapter<E> {
    pub fn new(svc: Arc<TaskService<E>>) -> Self {
        Self { svc }
    }
}

fn log<T>(method: &str, id: &str, r: Result<T, Error>) -> TtrpcResult<T> {
    match r {
        Ok(v) => {
            tracing::debug!(method, id, "ok");
            Ok(v)
        }
        Err(e) => {
            tracing::warn!(method, id, code = ?e.code(), error = %e, "failed");
            Err(e.into())
        }
    }
}

fn empty(r: Result<(), Error>) -> Result<Empty, Error> {
    r.map(|()| Empty::new())
}

#[async_trait::async_trait]
impl<E: EventSender> Task for TaskAdapter<E> {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let id = req.id.clone();
        log("State", &id, self.svc.state(req).await)
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        log("Create", &id, self.svc.create(req).await)
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let id = req.id.clone();
        log("Start", &id, self.svc.start(req).await)
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let id = req.id.clone();
        log("Delete", &id, self.svc.delete(req).await)
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let id = req.id.clone();
        log("Pids", &id, self.svc.pids(req).await)
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("Pause", &id, empty(self.svc.pause(req).await))
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("Resume", &id, empty(self.svc.resume(req).await))
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        let e = Error::Unimplemented(
            "checkpoint is not supported by io.containerd.clh.v2 (the container runs in a VM)"
                .into(),
        );
        log("Checkpoint", &req.id, Err(e))
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("Kill", &id, empty(self.svc.kill(req).await))
    }

    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("Exec", &id, empty(self.svc.exec(req).await))
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("ResizePty", &id, empty(self.svc.resize_pty(req).await))
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("CloseIO", &id, empty(self.svc.close_io(req).await))
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let id = req.id.clone();
        log("Update", &id, empty(self.svc.update(req).await))
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let id = req.id.clone();
        log("Wait", &id, self.svc.wait(req).await)
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let id = req.id.clone();
        log("Stats", &id, self.svc.stats(req).await)
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let id = req.id.clone();
        log("Connect", &id, self.svc.connect(req).await)
    }

    async fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        log("Shutdown", &req.id, empty(self.svc.shutdown().await))
    }
}
