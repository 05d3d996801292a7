//! A CRI client acting as a minimal kubelet, for end-to-end tests of a
//! runtime handler through containerd's CRI plugin.
//!
//! [`Cri`] wraps the CRI v1 RuntimeService and ImageService (the `k8s-cri`
//! stubs) over containerd's gRPC Unix socket. Its methods are blocking (it
//! owns a small tokio runtime), so tests and scenarios read as the kubelet's
//! sequence of calls, and it is `Sync`: threads may share one client. Every
//! call has a deadline, sent to the server as the gRPC timeout and enforced
//! here as well; a failure names the call, its subject and the gRPC status.
//!
//! [`Kubelet`] adds what a kubelet does around the calls (images, pod
//! cgroups, log dirs, leak checks, restarting containerd) on top of a
//! [`PrivateContainerd`](crate::containerd::PrivateContainerd);
//! [`scenarios`] holds the handler-generic end-to-end scenarios.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

mod config;
mod kubelet;
mod runc_parity;
pub mod scenarios;
mod streaming;

pub use config::{ContainerBuilder, PodBuilder, Resources, Seccomp};
pub use k8s_cri::v1 as api;
pub use k8s_cri::v1::ContainerState;
pub use kubelet::{image_tar, CriSetup, Kubelet, LeakCheck, NodeConfigFn, Pod, BUSYBOX, PAUSE};
pub use streaming::Streamed;

/// Default deadline of one call: containerd answers in milliseconds, but a
/// VM runtime boots a guest in RunPodSandbox (seconds under TCG, more on a
/// loaded 2-core host).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How often [`Cri::wait_for`] polls.
const POLL: Duration = Duration::from_millis(100);

/// What ExecSync returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// A blocking CRI v1 client over a Unix socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

/// The largest answer the client takes: more than the kubelet's 16 MiB,
/// so that an ExecSync answer at containerd's 16 MiB output cap (plus its
/// framing) still decodes.
const MAX_MESSAGE: usize = 32 << 20;

impl Cri {
    /// Connects to the CRI server listening on `socket` (containerd's gRPC
    /// address) with [`CALL_TIMEOUT`] per call.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the CRI client's tokio runtime")?;
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://localhost")?.connect_timeout(CALL_TIMEOUT);
        let channel = rt
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                })),
            )
            .with_context(|| format!("connecting to the CRI socket {}", socket.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            images: ImageServiceClient::new(channel),
            rt,
            timeout: CALL_TIMEOUT,
        })
    }

    /// Replaces the per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one call with `timeout`: the gRPC deadline tells the server, the
    /// local one also covers a server that never answers.
    fn call<T, F, Fut>(&self, what: &str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let fut = f(self.runtime.clone(), self.images.clone(), timeout);
        // The timer must be made inside the runtime: it needs its clock.
        match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, fut).await })
        {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(anyhow!(
                "CRI {what} failed: {:?}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => bail!("CRI {what} did not answer within {timeout:?}"),
        }
    }

    /// A request carrying `timeout` as its gRPC deadline.
    fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    pub fn version(&self) -> Result<cri::VersionResponse> {
        self.call("Version", self.timeout, |mut rs, _, t| async move {
            rs.version(Self::req(cri::VersionRequest::default(), t))
                .await
        })
    }

    /// The runtime's conditions (RuntimeReady, NetworkReady) by type.
    pub fn status(&self) -> Result<Vec<cri::RuntimeCondition>> {
        let resp = self.call("Status", self.timeout, |mut rs, _, t| async move {
            rs.status(Self::req(cri::StatusRequest::default(), t)).await
        })?;
        Ok(resp.status.map(|s| s.conditions).unwrap_or_default())
    }

    /// Whether runtime handler `handler` reports recursive read-only
    /// mounts in Status, which a kubelet checks before it sends a
    /// `recursiveReadOnly` mount.
    pub fn supports_recursive_read_only(&self, handler: &str) -> Result<bool> {
        let resp = self.call("Status", self.timeout, |mut rs, _, t| async move {
            rs.status(Self::req(cri::StatusRequest::default(), t)).await
        })?;
        Ok(resp
            .runtime_handlers
            .iter()
            .find(|h| h.name == handler)
            .and_then(|h| h.features.as_ref())
            .is_some_and(|f| f.recursive_read_only_mounts))
    }

    /// Waits until Status reports RuntimeReady and NetworkReady, as the
    /// kubelet does before it runs pods (after a containerd restart the CRI
    /// plugin answers "not initialized" until it has recovered its state).
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let mut last = String::new();
        self.wait_for("the CRI runtime to be ready", within, |c| {
            match c.status() {
                Ok(conds) => {
                    let ready = |ty: &str| conds.iter().any(|c| c.r#type == ty && c.status);
                    if ready("RuntimeReady") && ready("NetworkReady") {
                        return Ok(Some(()));
                    }
                    last = format!("{conds:?}");
                }
                Err(e) => last = format!("{e:#}"),
            }
            Ok(None)
        })
        .with_context(|| format!("last answer: {last}"))
    }

    /// The image `name` as the CRI plugin sees it, None if it has none.
    pub fn image_status(&self, name: &str) -> Result<Option<cri::Image>> {
        let image = image_spec(name);
        let resp = self.call(
            &format!("ImageStatus({name})"),
            self.timeout,
            |_, mut is, t| async move {
                let msg = cri::ImageStatusRequest {
                    image: Some(image),
                    verbose: false,
                };
                is.image_status(Self::req(msg, t)).await
            },
        )?;
        Ok(resp.image)
    }

    /// RunPodSandbox with `runtime_handler`; returns the sandbox id.
    pub fn run_pod_sandbox(
        &self,
        config: &cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let msg = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.to_owned(),
        };
        let name = config.metadata.as_ref().map(|m| m.name.as_str());
        let what = format!(
            "RunPodSandbox({}, handler {runtime_handler})",
            name.unwrap_or("")
        );
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.run_pod_sandbox(Self::req(msg, t)).await
        })?;
        Ok(resp.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        let msg = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: false,
        };
        let what = format!("PodSandboxStatus({pod_id})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.pod_sandbox_status(Self::req(msg, t)).await
        })?;
        resp.status
            .with_context(|| format!("{what} returned no status"))
    }

    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let msg = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        let what = format!("StopPodSandbox({pod_id})");
        self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.stop_pod_sandbox(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let msg = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        let what = format!("RemovePodSandbox({pod_id})");
        self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.remove_pod_sandbox(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    /// All pod sandboxes, ready or not.
    pub fn list_pod_sandbox(&self) -> Result<Vec<cri::PodSandbox>> {
        let resp = self.call("ListPodSandbox", self.timeout, |mut rs, _, t| async move {
            rs.list_pod_sandbox(Self::req(cri::ListPodSandboxRequest::default(), t))
                .await
        })?;
        Ok(resp.items)
    }

    /// CreateContainer in `pod_id`; `sandbox_config` is the pod's config,
    /// as the kubelet passes it. Returns the container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        sandbox_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let msg = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let what = format!("CreateContainer({} in {pod_id})", name.unwrap_or_default());
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.create_container(Self::req(msg, t)).await
        })?;
        Ok(resp.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let msg = cri::StartContainerRequest {
            container_id: id.to_owned(),
        };
        let what = format!("StartContainer({id})");
        self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.start_container(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    /// The container's state, exit code and reason (e.g. "OOMKilled").
    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let msg = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        let what = format!("ContainerStatus({id})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.container_status(Self::req(msg, t)).await
        })?;
        resp.status
            .with_context(|| format!("{what} returned no status"))
    }

    /// ExecSync of `cmd` with `timeout` for the command itself (the call's
    /// deadline adds the client's per-call timeout to it).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecResult> {
        let msg = cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs())?,
        };
        let what = format!("ExecSync({id}, {cmd:?})");
        let resp = self.call(&what, timeout + self.timeout, |mut rs, _, t| async move {
            rs.exec_sync(Self::req(msg, t)).await
        })?;
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
            exit_code: resp.exit_code,
        })
    }

    /// UpdateContainerResources: the container's new Linux limits.
    pub fn update_container_resources(&self, id: &str, r: Resources) -> Result<()> {
        let msg = cri::UpdateContainerResourcesRequest {
            container_id: id.to_owned(),
            linux: Some(r.to_cri()),
            ..Default::default()
        };
        let what = format!("UpdateContainerResources({id}, {r:?})");
        self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.update_container_resources(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let msg = cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        };
        let what = format!("ContainerStats({id})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.container_stats(Self::req(msg, t)).await
        })?;
        resp.stats
            .with_context(|| format!("{what} returned no stats"))
    }

    /// ListContainerStats, of one pod's containers or of all.
    pub fn list_container_stats(&self, pod_id: Option<&str>) -> Result<Vec<cri::ContainerStats>> {
        let msg = cri::ListContainerStatsRequest {
            filter: pod_id.map(|p| cri::ContainerStatsFilter {
                pod_sandbox_id: p.to_owned(),
                ..Default::default()
            }),
        };
        let what = format!("ListContainerStats({})", pod_id.unwrap_or("all"));
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.list_container_stats(Self::req(msg, t)).await
        })?;
        Ok(resp.stats)
    }

    /// StopContainer with a grace period of `timeout` (whole seconds, as in
    /// the CRI): SIGTERM (or the image's stop signal), SIGKILL after it.
    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let msg = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: i64::try_from(timeout.as_secs())?,
        };
        let what = format!("StopContainer({id}, {timeout:?})");
        self.call(&what, timeout + self.timeout, |mut rs, _, t| async move {
            rs.stop_container(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let msg = cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        let what = format!("RemoveContainer({id})");
        self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.remove_container(Self::req(msg, t)).await
        })?;
        Ok(())
    }

    /// ListContainers, of one pod or of all.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<cri::Container>> {
        let msg = cri::ListContainersRequest {
            filter: pod_id.map(|p| cri::ContainerFilter {
                pod_sandbox_id: p.to_owned(),
                ..Default::default()
            }),
        };
        let what = format!("ListContainers({})", pod_id.unwrap_or("all"));
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.list_containers(Self::req(msg, t)).await
        })?;
        Ok(resp.containers)
    }

    /// Polls `check` until it returns Some, an error, or `within` passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Cri) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {within:?} waiting for {what}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until container `id` is in `state`; returns its status then.
    pub fn wait_container_state(
        &self,
        id: &str,
        state: ContainerState,
        within: Duration,
    ) -> Result<cri::ContainerStatus> {
        let mut last = None;
        self.wait_for(&format!("container {id} to be {state:?}"), within, |c| {
            let s = c.container_status(id)?;
            let reached = s.state == state as i32;
            last = Some(s.clone());
            Ok(reached.then_some(s))
        })
        .with_context(|| format!("last status: {last:?}"))
    }
}

/// An ImageSpec naming `image`.
pub fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}
