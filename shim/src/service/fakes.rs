//! A fake hypervisor and a fake agent, so the service runs its real code
//! (virtiofsd, mounts, cgroups, the agent client and its hybrid-vsock
//! handshake) without a guest.
//!
//! [`FakeVm`] stands a `sleep` process in for the VMM (a real pid for the
//! pod cgroup and the leak checks) and, when it boots "with an agent",
//! answers the hybrid-vsock handshake on its vsock socket and forwards the
//! stream to a [`FakeAgent`] served over ttrpc in the test process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clh_agent_protocol::{
    CheckRequest, CheckResponse, ContainerRequest, ContainerStatsResponse, CreateContainerRequest,
    CreateContainerResponse, Empty, IdentityRequest, OomEvent, ProcessRequest, SeedRandomRequest,
    SeedRandomResponse, SignalProcessRequest, StartProcessResponse, VersionRequest,
    VersionResponse, WaitProcessResponse, PROTOCOL_VERSION,
};
use clh_hypervisor::{Hypervisor, HypervisorFactory, VmSize, VmSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ttrpc::r#async::TtrpcContext;

pub(crate) use crate::vm::is_running;

/// How a [`FakeVm`] boots.
#[derive(Clone, Copy, Debug)]
pub enum Boot {
    /// The VMM runs and the agent answers.
    WithAgent,
    /// The VMM runs but nothing answers on the vsock socket.
    Silent,
    /// The VMM runs, then exits before the agent answers.
    VmmExits,
    /// `start` fails with this error.
    Fails(fn() -> clh_hypervisor::Error),
}

/// What the fakes of one test share: how VMs boot, the agent, and every
/// VMM pid ever spawned (for the leak check).
#[derive(Clone)]
pub struct Fakes {
    pub boot: Boot,
    pub agent: FakeAgent,
    pub vmm_pids: Arc<Mutex<Vec<u32>>>,
}

impl Fakes {
    pub fn new(boot: Boot) -> Self {
        Fakes {
            boot,
            agent: FakeAgent::default(),
            vmm_pids: Arc::default(),
        }
    }

    pub fn factory(&self) -> HypervisorFactory {
        let fakes = self.clone();
        HypervisorFactory::new(move |_, _| Box::new(FakeVm::new(fakes.clone())))
    }
}

pub struct FakeVm {
    fakes: Fakes,
    dir: PathBuf,
    vmm: Option<std::process::Child>,
    /// In a mutex: the server is not `Sync`, a [`Hypervisor`] must be.
    server: Mutex<Option<ttrpc::r#async::Server>>,
    proxy: Option<JoinHandle<()>>,
    exited: watch::Sender<Option<String>>,
}

impl FakeVm {
    fn new(fakes: Fakes) -> Self {
        FakeVm {
            fakes,
            dir: PathBuf::new(),
            vmm: None,
            server: Mutex::default(),
            proxy: None,
            exited: watch::channel(None).0,
        }
    }

    /// Serves the fake agent on `fake-agent.sock` and the hybrid-vsock
    /// socket in front of it. Test code: a failure here panics.
    async fn serve_agent(&mut self) {
        let agent_sock = self.dir.join("fake-agent.sock");
        let service = clh_agent_protocol::create_agent(Arc::new(self.fakes.agent.clone()));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", agent_sock.display()))
            .expect("fake agent socket")
            .register_service(service);
        server.start().await.expect("fake agent server");
        *self.server.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(server);
        let listener = UnixListener::bind(self.vsock_socket()).expect("fake vsock socket");
        self.proxy = Some(tokio::spawn(hybrid_vsock_proxy(listener, agent_sock)));
    }
}

/// Answers `CONNECT <port>` with `OK <port>` and forwards the stream to
/// the fake agent (every port: the tests attach no stdio).
async fn hybrid_vsock_proxy(listener: UnixListener, agent: PathBuf) {
    while let Ok((stream, _)) = listener.accept().await {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            let port = line.trim().trim_start_matches("CONNECT ").to_string();
            let mut stream = stream.into_inner();
            let Ok(mut upstream) = UnixStream::connect(&agent).await else {
                return;
            };
            if stream
                .write_all(format!("OK {port}\n").as_bytes())
                .await
                .is_ok()
            {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
        });
    }
}

#[async_trait]
impl Hypervisor for FakeVm {
    async fn start(&mut self, spec: &VmSpec) -> clh_hypervisor::Result<()> {
        self.dir = spec.dir.clone();
        if let Boot::Fails(error) = self.fakes.boot {
            return Err(error());
        }
        let vmm = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .map_err(|source| clh_hypervisor::Error::Spawn {
                binary: "sleep".into(),
                source,
            })?;
        self.fakes
            .vmm_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(vmm.id());
        self.vmm = Some(vmm);
        match self.fakes.boot {
            Boot::WithAgent => self.serve_agent().await,
            Boot::VmmExits => {
                self.exited.send_replace(Some("exit status 1".into()));
            }
            Boot::Silent | Boot::Fails(_) => {}
        }
        Ok(())
    }

    fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    fn pids(&self) -> Vec<u32> {
        self.vmm.iter().map(|c| c.id()).collect()
    }

    async fn wait_exit(&self) -> String {
        let mut exited = self.exited.subscribe();
        let how = exited
            .wait_for(|e| e.is_some())
            .await
            .map(|how| how.clone());
        match how {
            Ok(how) => how.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    async fn resize(&self, _target: VmSize) -> clh_hypervisor::Result<VmSize> {
        Err(clh_hypervisor::Error::Unsupported("resizing a fake VM"))
    }

    async fn stop(&mut self, _timeout: Duration) -> clh_hypervisor::Result<()> {
        if let Some(proxy) = self.proxy.take() {
            proxy.abort();
        }
        let server = self.server.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut server) = server.take() {
            let _ = server.shutdown().await;
        }
        if let Some(mut vmm) = self.vmm.take() {
            let _ = vmm.kill();
            let _ = vmm.wait();
        }
        for name in ["vsock.sock", "fake-agent.sock"] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        self.exited.send_replace(Some("stopped".into()));
        Ok(())
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        if let Some(mut vmm) = self.vmm.take() {
            let _ = vmm.kill();
            let _ = vmm.wait();
        }
    }
}

/// The guest pid the fake agent gives every process.
pub const GUEST_PID: u32 = 42;

/// An agent whose containers run nothing: a process "exits" when it is
/// signalled, with 128 + the signal.
#[derive(Clone, Default)]
pub struct FakeAgent {
    /// Set: CreateContainer answers INVALID_ARGUMENT with this message.
    pub refuse_create: Arc<Mutex<Option<String>>>,
    /// Set: CreateContainer waits for a permit of this semaphore (a slow
    /// guest), after it was recorded in `calls`.
    pub hold_create: Arc<Mutex<Option<Arc<tokio::sync::Semaphore>>>>,
    /// The methods called, in order (health checks left out).
    pub calls: Arc<Mutex<Vec<&'static str>>>,
    /// Set: health checks get no answer, as from a hung agent.
    pub hung: Arc<AtomicBool>,
    /// Set: health checks answer with another boot id, as after a guest
    /// reboot (Cloud Hypervisor reboots a panicked guest).
    pub rebooted: Arc<AtomicBool>,
    exit: Arc<Mutex<Option<watch::Sender<Option<u32>>>>>,
}

impl FakeAgent {
    fn called(&self, method: &'static str) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(method);
    }

    fn exit(&self) -> watch::Sender<Option<u32>> {
        self.exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl clh_agent_protocol::Agent for FakeAgent {
    async fn version(&self, _: &TtrpcContext, _: VersionRequest) -> ttrpc::Result<VersionResponse> {
        self.called("Version");
        Ok(VersionResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            ..Default::default()
        })
    }

    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let boot = match self.rebooted.load(Ordering::SeqCst) {
            false => "fake-boot",
            true => "fake-boot-after-a-reboot",
        };
        Ok(CheckResponse {
            boot_id: boot.into(),
            ..Default::default()
        })
    }

    async fn seed_random(
        &self,
        _: &TtrpcContext,
        req: SeedRandomRequest,
    ) -> ttrpc::Result<SeedRandomResponse> {
        self.called("SeedRandom");
        Ok(SeedRandomResponse {
            credited_bytes: u32::try_from(req.seed.len()).unwrap_or_default(),
            crng_ready: true,
            entropy_avail: 256,
            ..Default::default()
        })
    }

    async fn set_identity(&self, _: &TtrpcContext, _: IdentityRequest) -> ttrpc::Result<Empty> {
        self.called("SetIdentity");
        Ok(Empty::default())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        _: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.called("CreateContainer");
        let hold = self
            .hold_create
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(gate) = hold {
            let _ = gate.acquire().await;
        }
        let refusal = self
            .refuse_create
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(message) = refusal {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                message,
            )));
        }
        Ok(CreateContainerResponse {
            pid: GUEST_PID,
            ..Default::default()
        })
    }

    async fn start_process(
        &self,
        _: &TtrpcContext,
        _: ProcessRequest,
    ) -> ttrpc::Result<StartProcessResponse> {
        self.called("StartProcess");
        Ok(StartProcessResponse {
            pid: GUEST_PID,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        _: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let mut exit = self.exit().subscribe();
        let status = exit.wait_for(|e| e.is_some()).await.map(|status| *status);
        let status = match status {
            Ok(status) => status.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        };
        Ok(WaitProcessResponse {
            exit_status: status,
            exited_at_ns: 1,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("SignalProcess");
        self.exit().send_replace(Some(128 + req.signal));
        Ok(Empty::default())
    }

    async fn container_stats(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<ContainerStatsResponse> {
        Ok(ContainerStatsResponse::default())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("RemoveContainer");
        Ok(Empty::default())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        std::future::pending().await
    }
}

/// Where a real virtiofsd is (the service tests run the real one).
pub fn virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// Pids of the processes whose command line mentions `dir` (virtiofsd's
/// names its socket and shared directory there).
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && is_running(pid))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// Mount points at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}
