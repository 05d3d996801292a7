//! Typed wrappers of the container and process RPCs. Each has the client's
//! call timeout, except the long polls (WaitProcess, GetOomEvent): those
//! have none and are cancelled by dropping their future (e.g. in a
//! `tokio::select!`), which abandons the request on the client side.

use clh_agent_protocol::{
    ContainerRequest, ContainerStatsResponse, CreateContainerRequest, Empty, ExecProcessRequest,
    NetworkConfig, ProcessRequest, ResizeTtyRequest, SignalProcessRequest, Stdio,
    SyncVolumeRequest, SysctlsRequest, UpdateContainerRequest, VolumeRequest, WaitProcessResponse,
};

use crate::{AgentClient, Result};

fn process(container_id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

fn container(container_id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    }
}

/// No deadline: for the long polls.
fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

impl AgentClient {
    /// Creates the container and its init process (not started); returns
    /// the init's guest pid. `oci_spec` is config.json with root.path
    /// rewritten to the guest path of the rootfs.
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec: &[u8],
        stdio: Stdio,
    ) -> Result<u32> {
        let req = CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec: oci_spec.to_vec(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let r = crate::metrics::timed(
            "CreateContainer",
            self.inner.create_container(self.ctx(), &req),
        )
        .await;
        Ok(r.map_err(self.failed("CreateContainer"))?.pid)
    }

    /// Registers an exec (`process` = OCI Process JSON); start it with
    /// [`AgentClient::start_process`] after attaching its streams.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &[u8],
        stdio: Stdio,
    ) -> Result<()> {
        let req = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process: process.to_vec(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let r =
            crate::metrics::timed("ExecProcess", self.inner.exec_process(self.ctx(), &req)).await;
        r.map(drop).map_err(self.failed("ExecProcess"))
    }

    /// Starts init (`exec_id` "") or an exec; returns its guest pid.
    pub async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let req = process(container_id, exec_id);
        let r =
            crate::metrics::timed("StartProcess", self.inner.start_process(self.ctx(), &req)).await;
        Ok(r.map_err(self.failed("StartProcess"))?.pid)
    }

    /// Long poll, no deadline: returns once the process has exited.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        let req = process(container_id, exec_id);
        let r = self.inner.wait_process(no_timeout(), &req).await;
        r.map_err(self.failed("WaitProcess"))
    }

    /// Sends `signal` to the process, or with `all` to every process of
    /// the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        let r = crate::metrics::timed("SignalProcess", self.inner.signal_process(self.ctx(), &req))
            .await;
        r.map(drop).map_err(self.failed("SignalProcess"))
    }

    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let req = ResizeTtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            width,
            height,
            ..Default::default()
        };
        let r = crate::metrics::timed("ResizeTty", self.inner.resize_tty(self.ctx(), &req)).await;
        r.map(drop).map_err(self.failed("ResizeTty"))
    }

    /// Closes the process's stdin (as a half-close of its stdin stream does).
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = process(container_id, exec_id);
        let r = crate::metrics::timed("CloseStdin", self.inner.close_stdin(self.ctx(), &req)).await;
        r.map(drop).map_err(self.failed("CloseStdin"))
    }

    pub async fn container_stats(&self, container_id: &str) -> Result<ContainerStatsResponse> {
        let req = container(container_id);
        let r = crate::metrics::timed(
            "ContainerStats",
            self.inner.container_stats(self.ctx(), &req),
        );
        r.await.map_err(self.failed("ContainerStats"))
    }

    /// Applies `resources` (OCI LinuxResources JSON) to the container's cgroup.
    pub async fn update_container(&self, container_id: &str, resources: &[u8]) -> Result<()> {
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources: resources.to_vec(),
            ..Default::default()
        };
        let r = crate::metrics::timed(
            "UpdateContainer",
            self.inner.update_container(self.ctx(), &req),
        )
        .await;
        r.map(drop).map_err(self.failed("UpdateContainer"))
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        let r = crate::metrics::timed(
            "PauseContainer",
            self.inner.pause_container(self.ctx(), &req),
        );
        r.await.map(drop).map_err(self.failed("PauseContainer"))
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        let r = crate::metrics::timed(
            "ResumeContainer",
            self.inner.resume_container(self.ctx(), &req),
        );
        r.await.map(drop).map_err(self.failed("ResumeContainer"))
    }

    pub async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = container(container_id);
        let r = crate::metrics::timed("ListPids", self.inner.list_pids(self.ctx(), &req));
        Ok(r.await.map_err(self.failed("ListPids"))?.pids)
    }

    /// Kills what is left of the container and removes it.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = container(container_id);
        let r = crate::metrics::timed(
            "RemoveContainer",
            self.inner.remove_container(self.ctx(), &req),
        );
        r.await.map(drop).map_err(self.failed("RemoveContainer"))
    }

    /// Long poll, no deadline: the id of the next container with an OOM kill.
    pub async fn get_oom_event(&self) -> Result<String> {
        let r = self
            .inner
            .get_oom_event(no_timeout(), &Empty::default())
            .await;
        Ok(r.map_err(self.failed("GetOomEvent"))?.container_id)
    }

    /// Sends one piece of a volume snapshot (volume_sync.rs builds it).
    pub async fn sync_volume(&self, req: &SyncVolumeRequest) -> Result<()> {
        let r = crate::metrics::timed("SyncVolume", self.inner.sync_volume(self.ctx(), req)).await;
        r.map(drop).map_err(self.failed("SyncVolume"))
    }

    /// Removes the guest's copy of volume `volume` of the container.
    pub async fn remove_volume(&self, container_id: &str, volume: u32) -> Result<()> {
        let req = VolumeRequest {
            container_id: container_id.to_owned(),
            volume,
            ..Default::default()
        };
        let r =
            crate::metrics::timed("RemoveVolume", self.inner.remove_volume(self.ctx(), &req)).await;
        r.map(drop).map_err(self.failed("RemoveVolume"))
    }

    /// Configures the guest's interfaces and routes (once, before the
    /// first container).
    pub async fn configure_network(&self, config: &NetworkConfig) -> Result<()> {
        let r = crate::metrics::timed(
            "ConfigureNetwork",
            self.inner.configure_network(self.ctx(), config),
        )
        .await;
        r.map(drop).map_err(self.failed("ConfigureNetwork"))
    }

    /// Writes `sysctls` in the guest's own namespaces, the ones the pod's
    /// containers share (names as the OCI spec has them).
    pub async fn apply_sysctls(
        &self,
        sysctls: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let req = SysctlsRequest {
            sysctls: sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        };
        let r =
            crate::metrics::timed("ApplySysctls", self.inner.apply_sysctls(self.ctx(), &req)).await;
        r.map(drop).map_err(self.failed("ApplySysctls"))
    }

    /// Onlines the vCPUs (and memory) hot-plugged into the guest.
    pub async fn online_resources(&self) -> Result<()> {
        let r = crate::metrics::timed(
            "OnlineResources",
            self.inner.online_resources(self.ctx(), &Empty::default()),
        )
        .await;
        r.map(drop).map_err(self.failed("OnlineResources"))
    }
}
