//! Cloud Hypervisor backend: one `cloud-hypervisor --api-socket` process per
//! VM, configured and booted through its REST API ([`client::ApiClient`]).
//! The process runs in the pod's network namespace ([`VmSpec::netns`]) and
//! gets one virtio-net device per existing tap there ([`net_config`]).
//! With [`VmSpec::restore_from`], the VM is restored from a template made
//! by [`save_template`] instead of created and booted (`template.rs`).
//!
//! Files in the VM's state directory:
//! - `ch-api.sock`: the API socket;
//! - `vsock.sock`: the hybrid-vsock socket (guest cid 3);
//! - `vmm.log`: CH's stdout and stderr;
//! - `console.pipe`: the FIFO CH writes the serial console into, copied
//!   into the bounded `console.log` ([`crate::console_log`]).

pub mod api;
pub mod client;
pub mod resize;
mod template;
mod vm_config;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod spec_tests;
#[cfg(test)]
mod template_tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::time::Instant;

use self::api::VmmPingResponse;
use self::api::{DiskConfig, FsConfig, NetConfig, PciDeviceInfo, VmCounters, VmInfo};
use self::client::ApiClient;
use crate::console_log::ConsoleLog;
use crate::process::{ManagedProcess, NetNs};
use crate::{check_nics, socket_path, Error, Hypervisor, Result, VmSize, VmSpec};

pub use self::template::{save_template, template_identity};
pub use self::vm_config::{net_config, template_config, vm_config, vsock_config};

/// The CH major version whose API (`cloud-hypervisor-v53.0-openapi.yaml`) this
/// backend is written and tested against.
pub const TARGET_MAJOR_VERSION: &str = "53";

/// Deadline of API calls made after start (`info`, hot-plugs, ...).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Lower bound for each graceful-shutdown API call, so a nearly spent stop
/// timeout still gives CH a chance to answer.
const MIN_SHUTDOWN_CALL: Duration = Duration::from_millis(100);

const API_SOCKET: &str = "ch-api.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
const VMM_LOG: &str = "vmm.log";

/// The sockets this backend binds in the VM directory.
pub(crate) const SOCKET_NAMES: &[&str] = &[API_SOCKET, VSOCK_SOCKET];

pub struct CloudHypervisor {
    binary: PathBuf,
    vmm: Option<Vmm>,
}

/// A started CH process and what it created.
struct Vmm {
    process: ManagedProcess,
    /// Copies the guest console into its bounded log; dropped with the VMM.
    console: ConsoleLog,
    client: ApiClient,
    vsock_socket: PathBuf,
    ping: VmmPingResponse,
    /// The size the VM has now (boot size, then what `resize` plugged),
    /// and what `vm.create` left room for. An async lock held across the
    /// `vm.resize` call, so concurrent resizes plan from the real size.
    size: tokio::sync::Mutex<VmSize>,
    max: VmSize,
}

impl CloudHypervisor {
    pub fn new(binary: PathBuf) -> Self {
        Self { binary, vmm: None }
    }

    /// The logs of the VM in `dir`, for error reports (see
    /// [`crate::Backend::log_files`]).
    pub fn log_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![("VMM log", dir.join(VMM_LOG))]
    }

    /// `vmm.ping` of the running VMM.
    pub async fn ping(&self) -> Result<VmmPingResponse> {
        self.client()?.ping().await
    }

    /// What `vmm.ping` answered at start (version, features).
    pub fn version(&self) -> Option<&VmmPingResponse> {
        self.vmm.as_ref().map(|vmm| &vmm.ping)
    }

    /// `vm.info`: state and effective configuration.
    pub async fn info(&self) -> Result<VmInfo> {
        self.client()?.info().await
    }

    /// Hot-plugs (or, before boot, cold-adds) a virtio-fs device.
    pub async fn add_fs(&self, fs: FsConfig) -> Result<Option<PciDeviceInfo>> {
        self.client()?.add_fs(&fs).await
    }

    pub async fn add_net(&self, net: NetConfig) -> Result<Option<PciDeviceInfo>> {
        self.client()?.add_net(&net).await
    }

    pub async fn add_disk(&self, disk: DiskConfig) -> Result<Option<PciDeviceInfo>> {
        self.client()?.add_disk(&disk).await
    }

    pub async fn counters(&self) -> Result<VmCounters> {
        self.client()?.counters().await
    }

    /// The API client of the running VMM; an error once it has exited.
    fn client(&self) -> Result<&ApiClient> {
        match &self.vmm {
            None => Err(Error::InvalidSpec(
                "the Cloud Hypervisor VM is not started; call start first".into(),
            )),
            Some(vmm) if vmm.process.exited().is_some() => Err(vmm.process.exited_early()),
            Some(vmm) => Ok(&vmm.client),
        }
    }

    /// Spawns CH and brings the VM to booting; `vmm` is set as soon as the
    /// process exists so that a failure can stop it.
    async fn start_vmm(&mut self, spec: &VmSpec, deadline: Instant) -> Result<()> {
        let api_socket = socket_path(&spec.dir, API_SOCKET)?;
        let vsock_socket = socket_path(&spec.dir, VSOCK_SOCKET)?;
        check_nics(&spec.nics)?;
        let netns = spec.netns.as_deref().map(NetNs::open).transpose()?;
        // Leftovers of an earlier VMM in this directory would make CH fail
        // to bind, or make us talk to a dead socket.
        remove_socket(&api_socket)?;
        remove_socket(&vsock_socket)?;

        // Before CH, which opens its FIFO at vm.create.
        let console = ConsoleLog::start(&spec.dir, &spec.console_log, spec.console_log_max_bytes)?;
        // In the pod's network namespace, where it opens the taps by name.
        let process = ManagedProcess::spawn_in(
            &format!("cloud-hypervisor for {}", spec.id),
            vmm_command(&self.binary, &api_socket, &spec.dir),
            &spec.dir.join(VMM_LOG),
            netns.as_ref(),
        )?;
        drop(netns);
        let boot_size = VmSize {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        let vmm = self.vmm.insert(Vmm {
            process,
            console,
            client: ApiClient::new(&api_socket, API_TIMEOUT),
            vsock_socket: vsock_socket.clone(),
            ping: VmmPingResponse {
                version: String::new(),
                build_version: String::new(),
                pid: None,
                features: Vec::new(),
            },
            size: tokio::sync::Mutex::new(boot_size),
            max: spec.max.unwrap_or(boot_size),
        });

        wait_for_api_socket(&vmm.process, &api_socket, remaining(deadline)).await?;
        vmm.ping = vmm.client.ping_within(remaining(deadline)).await?;
        check_version(&vmm.ping);
        if let Some(snapshot_dir) = &spec.restore_from {
            let client = &vmm.client;
            return template::restore(client, spec, snapshot_dir, &vsock_socket, deadline).await;
        }
        let config = vm_config(spec, &vsock_socket);
        vmm.client
            .create_within(&config, remaining(deadline))
            .await?;
        vmm.client.boot_within(remaining(deadline)).await
    }
}

#[async_trait]
impl Hypervisor for CloudHypervisor {
    #[tracing::instrument(skip_all, fields(id = %spec.id))]
    async fn start(&mut self, spec: &VmSpec) -> Result<()> {
        if let Some(vmm) = &self.vmm {
            if vmm.process.exited().is_none() {
                return Err(Error::InvalidSpec(
                    "this Cloud Hypervisor VM is already started; stop it first".into(),
                ));
            }
        }
        let deadline = Instant::now() + spec.start_timeout;
        let Err(error) = self.start_vmm(spec, deadline).await else {
            return Ok(());
        };
        // A dead VMM explains more (its log) than a refused connection or a
        // timeout does.
        let error = match &self.vmm {
            Some(vmm) if vmm.process.exited().is_some() => vmm.process.exited_early(),
            _ => error,
        };
        if let Err(stop_error) = self.stop(Duration::ZERO).await {
            tracing::warn!(error = %stop_error, "cleanup after a failed start failed");
        }
        Err(error)
    }

    fn vsock_socket(&self) -> PathBuf {
        self.vmm
            .as_ref()
            .map(|vmm| vmm.vsock_socket.clone())
            .unwrap_or_default()
    }

    fn pids(&self) -> Vec<u32> {
        self.vmm
            .iter()
            .filter(|vmm| vmm.process.exited().is_none())
            .map(|vmm| vmm.process.pid())
            .collect()
    }

    async fn wait_exit(&self) -> String {
        match &self.vmm {
            Some(vmm) => vmm.process.wait_exit().await,
            None => "never started".to_string(),
        }
    }

    async fn resize(&self, target: VmSize) -> Result<VmSize> {
        let client = self.client()?;
        let Some(vmm) = &self.vmm else {
            return Err(Error::InvalidSpec("the VM is not started".into()));
        };
        let mut size = vmm.size.lock().await;
        let current = *size;
        let Some((request, after)) = resize::plan(current, vmm.max, target)? else {
            return Ok(current);
        };
        client.resize(&request).await?;
        *size = after;
        tracing::info!(from = %current, to = %after, "VM resized");
        Ok(after)
    }

    async fn stop(&mut self, timeout: Duration) -> Result<()> {
        let Some(vmm) = &self.vmm else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        if vmm.process.exited().is_none() {
            graceful_shutdown(vmm, deadline).await;
            vmm.process.terminate(remaining(deadline)).await?;
        }
        remove_socket(vmm.client.socket())?;
        remove_socket(vmm.console.pipe())?;
        remove_socket(&vmm.vsock_socket)
    }
}

/// How CH is started: `-v` (info level, so its log records each API
/// request and CH's own explanation of any failure) and its API socket,
/// in the VM directory `dir`, where the relative console path of a
/// restored template resolves (`template.rs`).
fn vmm_command(binary: &Path, api_socket: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("-v")
        .arg("--api-socket")
        .arg(format!("path={}", api_socket.display()))
        .current_dir(dir);
    cmd
}

/// `vm.shutdown` then `vmm.shutdown`, then waits for the process to exit,
/// all before `deadline`. Failures are expected (the VM may not be booted,
/// CH may be wedged) and only logged: the caller kills what is left.
async fn graceful_shutdown(vmm: &Vmm, deadline: Instant) {
    let call_timeout = || remaining(deadline).max(MIN_SHUTDOWN_CALL);
    if let Err(e) = vmm.client.shutdown_vm(call_timeout()).await {
        tracing::debug!(error = %e, "vm.shutdown failed; shutting the VMM down anyway");
    }
    if let Err(e) = vmm.client.shutdown_vmm(call_timeout()).await {
        tracing::debug!(error = %e, "vmm.shutdown failed; the process will be killed");
        return;
    }
    let _ = tokio::time::timeout(remaining(deadline), vmm.process.wait_exit()).await;
}

/// Waits for CH to accept connections on its API socket, failing early (with
/// CH's log) if the process exits first.
async fn wait_for_api_socket(
    process: &ManagedProcess,
    socket: &Path,
    timeout: Duration,
) -> Result<()> {
    crate::wait::wait_until("the Cloud Hypervisor API socket", timeout, || async {
        if process.exited().is_some() {
            return Some(Err(process.exited_early()));
        }
        tokio::net::UnixStream::connect(socket)
            .await
            .ok()
            .map(|_| Ok(()))
    })
    .await?
}

fn check_version(ping: &VmmPingResponse) {
    let major = ping.version.split('.').next().unwrap_or_default();
    if major == TARGET_MAJOR_VERSION {
        tracing::debug!(version = %ping.build_version, "Cloud Hypervisor is up");
    } else {
        tracing::warn!(
            version = %ping.version,
            build = %ping.build_version,
            target = TARGET_MAJOR_VERSION,
            "this Cloud Hypervisor is not the major version clh-shim targets; its API may differ"
        );
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn remove_socket(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            what: "cannot remove socket",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fake_ch, FAKE_CH_LINE};

    /// Issue 10: a CH start failure quotes CH's own log (`vmm.log`, where
    /// its stdout and stderr go), both in the backend's error and in the
    /// log files the backend names for the shim's report.
    #[tokio::test]
    async fn a_start_failure_quotes_the_vmm_log() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_ch(dir.path());
        let spec = VmSpec::for_test(dir.path());
        let mut ch = CloudHypervisor::new(binary);
        let err = ch.start(&spec).await.unwrap_err();
        assert!(matches!(err, Error::ExitedEarly { .. }), "{err:?}");
        assert!(err.to_string().contains(FAKE_CH_LINE), "{err}");
        assert!(ch.pids().is_empty());
        let logs = crate::Backend::CloudHypervisor.log_files(dir.path());
        let quoted: String = logs
            .iter()
            .map(|(_, path)| crate::process::log_tail(path, 30))
            .collect();
        assert!(quoted.contains(FAKE_CH_LINE), "{logs:?}: {quoted:?}");
    }

    #[tokio::test]
    async fn a_netns_that_cannot_be_opened_fails_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_ch(dir.path());
        let missing = dir.path().join("no-such-netns");
        let spec = VmSpec {
            netns: Some(missing.clone()),
            ..VmSpec::for_test(dir.path())
        };
        let mut ch = CloudHypervisor::new(binary);
        let err = ch.start(&spec).await.unwrap_err();
        assert!(
            matches!(&err, Error::Netns { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("no-such-netns"), "{err}");
        assert!(ch.pids().is_empty());
        assert!(!dir.path().join(VMM_LOG).exists(), "CH was spawned");
    }

    #[tokio::test]
    async fn an_invalid_nic_fails_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_ch(dir.path());
        let spec = VmSpec {
            nics: vec![crate::Nic {
                tap: "tap0".into(),
                mac: "not-a-mac".into(),
                mtu: 1500,
                queues: 1,
            }],
            ..VmSpec::for_test(dir.path())
        };
        let mut ch = CloudHypervisor::new(binary);
        let err = ch.start(&spec).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
        assert!(err.to_string().contains("not-a-mac"), "{err}");
        assert!(!dir.path().join(VMM_LOG).exists(), "CH was spawned");
    }
}
