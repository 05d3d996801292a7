//! QEMU TCG backend, for hosts without usable KVM.
//!
//! One VM is two processes: `vhost-device-vsock`, which serves the guest's
//! vsock device and exposes the same hybrid-vsock Unix socket as Cloud
//! Hypervisor (`CONNECT <port>\n` / `OK <port>\n`), and
//! `qemu-system-x86_64 -M pc -accel tcg` with virtio-pci devices, which runs
//! in the pod's network namespace ([`VmSpec::netns`]) and attaches the
//! shim's taps there by name (`-netdev tap,ifname=…`); vhost-device-vsock
//! stays in the shim's namespace. QEMU is stopped with SIGTERM,
//! on which it exits cleanly; there is no guest-side graceful shutdown to
//! wait for (the shim has already stopped the workload through the agent).

mod args;
mod console;
mod qmp;
mod template;

pub use template::{save_template, template_identity};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::time::Instant;

use crate::console_log::ConsoleLog;
use crate::process::{ManagedProcess, NetNs};
use crate::virtiofsd::socket_is_listening;
use crate::wait::wait_until;
use crate::{socket_path, Error, Hypervisor, Result, VmSize, VmSpec};

/// Files the backend creates in the VM directory.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const HYBRID_VSOCK_SOCKET: &str = "vsock.sock";
const QMP_SOCKET: &str = "qmp.sock";
const QEMU_LOG: &str = "qemu.log";
const VHOST_VSOCK_LOG: &str = "vhost-device-vsock.log";

/// The sockets this backend binds in the VM directory.
pub(crate) const SOCKET_NAMES: &[&str] = &[VHOST_VSOCK_SOCKET, HYBRID_VSOCK_SOCKET, QMP_SOCKET];

pub struct Qemu {
    binary: PathBuf,
    vhost_device_vsock: PathBuf,
    running: Option<Running>,
}

/// qboot, the firmware that boots a kernel fastest under `-M pc` (see
/// [`args::qemu_args`]), from QEMU's own data directory (`<prefix>/share/
/// qemu`, beside the binary's `bin/`), else Debian's; None: SeaBIOS.
fn fast_firmware(qemu: &Path) -> Option<PathBuf> {
    let beside = qemu
        .canonicalize()
        .ok()
        .and_then(|b| Some(b.parent()?.parent()?.join("share/qemu/qboot.rom")));
    beside
        .into_iter()
        .chain([PathBuf::from("/usr/share/qemu/qboot.rom")])
        .find(|p| p.is_file())
}

/// The processes and sockets of a started VM. Kept after `stop` so that
/// `wait_exit` can still say how QEMU ended.
struct Running {
    qemu: Arc<ManagedProcess>,
    /// Copies the guest console into its bounded log; dropped with the VM.
    console: ConsoleLog,
    vhost_vsock: ManagedProcess,
    hybrid_vsock: PathBuf,
    sockets: Vec<PathBuf>,
    /// Restored from a template: once started, the vsock device was
    /// hot-plugged and its driver seen started, so the agent may be
    /// connected at once (its console line was printed before the template
    /// was saved).
    restored: bool,
}

impl Qemu {
    pub fn new(binary: PathBuf, vhost_device_vsock: PathBuf) -> Self {
        Self {
            binary,
            vhost_device_vsock,
            running: None,
        }
    }

    /// The logs of the VM in `dir`, for error reports (see
    /// [`crate::Backend::log_files`]).
    pub fn log_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("VMM log", dir.join(QEMU_LOG)),
            ("vhost-device-vsock log", dir.join(VHOST_VSOCK_LOG)),
        ]
    }
}

fn remove_files(paths: &[PathBuf]) {
    for path in paths {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

/// Starts vhost-device-vsock and waits for its vhost-user socket.
async fn start_vhost_vsock(
    binary: &Path,
    spec: &VmSpec,
    vhost: &Path,
    uds: &Path,
    timeout: Duration,
) -> Result<ManagedProcess> {
    let mut cmd = Command::new(binary);
    cmd.args(args::vhost_vsock_args(vhost, uds));
    let process =
        ManagedProcess::spawn("vhost-device-vsock", cmd, &spec.dir.join(VHOST_VSOCK_LOG))?;
    // Probe without connecting: a connection is taken as the VMM's.
    let ready = wait_until(
        "vhost-device-vsock to listen on its vhost-user socket",
        timeout,
        || async {
            if process.exited().is_some() {
                return Some(Err(process.exited_early()));
            }
            socket_is_listening(vhost).then_some(Ok(()))
        },
    )
    .await
    .and_then(|r| r);
    match ready {
        Ok(()) => Ok(process),
        Err(e) => {
            // Reaped before returning, so the caller's cleanup sees no process.
            let _ = process.kill().await;
            Err(e)
        }
    }
}

impl Qemu {
    async fn try_start(&mut self, spec: &VmSpec, sockets: &[PathBuf; 3]) -> Result<()> {
        let [vhost, uds, qmp_socket] = sockets;
        let deadline = Instant::now() + spec.start_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let firmware = fast_firmware(&self.binary);
        let qemu_args = match &spec.restore_from {
            None => args::qemu_args(spec, vhost, qmp_socket, firmware.as_deref())?,
            Some(_) => {
                args::template_args(spec, qmp_socket, firmware.as_deref(), args::Layout::Restore)?
            }
        };
        for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
            if !path.is_file() {
                return Err(Error::InvalidSpec(format!(
                    "{what} {} does not exist",
                    path.display()
                )));
            }
        }
        let netns = spec.netns.as_deref().map(NetNs::open).transpose()?;
        // Before QEMU, which opens its FIFO at start.
        let console = ConsoleLog::start(&spec.dir, &spec.console_log, spec.console_log_max_bytes)?;
        let vhost_vsock =
            start_vhost_vsock(&self.vhost_device_vsock, spec, vhost, uds, left()).await?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&qemu_args);
        // In the pod's network namespace, where it opens the taps by name.
        let spawned = ManagedProcess::spawn_in(
            "qemu-system-x86_64",
            cmd,
            &spec.dir.join(QEMU_LOG),
            netns.as_ref(),
        );
        drop(netns);
        let qemu = match spawned {
            Ok(qemu) => Arc::new(qemu),
            Err(e) => {
                let _ = vhost_vsock.kill().await;
                return Err(e);
            }
        };
        console::spawn_power_off_watcher(console.powered_off(), Arc::downgrade(&qemu));
        // Registered before anything else can fail, so `stop` cleans up.
        self.running = Some(Running {
            qemu: qemu.clone(),
            console,
            vhost_vsock,
            hybrid_vsock: uds.clone(),
            sockets: sockets.to_vec(),
            restored: spec.restore_from.is_some(),
        });
        match &spec.restore_from {
            None => qmp::wait_running(qmp_socket, &qemu, left()).await?,
            Some(snapshot) => restore(spec, snapshot, vhost, qmp_socket, &qemu, left()).await?,
        }
        // vhost-device-vsock opens the hybrid-vsock socket once QEMU has set
        // the device up.
        wait_until(
            "the hybrid-vsock socket of vhost-device-vsock",
            left(),
            || async {
                if qemu.exited().is_some() {
                    return Some(Err(qemu.exited_early()));
                }
                socket_is_listening(uds).then_some(Ok(()))
            },
        )
        .await?
    }
}

/// Loads the template `snapshot` into the QEMU just started with
/// `-incoming defer`, then hot-plugs the pod's devices: vsock (until its
/// driver runs), virtio-fs, then each NIC (until its driver runs).
async fn restore(
    spec: &VmSpec,
    snapshot: &Path,
    vhost: &Path,
    qmp_socket: &Path,
    qemu: &ManagedProcess,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut qmp = qmp::Client::connect(qmp_socket, qemu, left()).await?;
    let what = "QEMU to restore the template and hot-plug the pod's devices";
    qemu.within(left(), what, async {
        let began = Instant::now();
        template::load(&mut qmp, snapshot).await?;
        let loaded = began.elapsed();
        // Every device added, then waited for: the guest takes them in
        // one round of hot-plug handling.
        template::plug_vsock(&mut qmp, vhost).await?;
        if let Some(fs) = &spec.shared_fs {
            template::plug_fs(&mut qmp, fs).await?;
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            template::plug_nic(&mut qmp, i, nic).await?;
        }
        template::wait_plugged(&mut qmp, spec.nics.len()).await?;
        // Where a restore's time goes (docs/BENCHMARKS.md): under TCG
        // about 70 ms to load, 95 ms for the guest to take the devices.
        tracing::debug!(
            load_ms = loaded.as_millis(),
            devices_ms = (began.elapsed() - loaded).as_millis(),
            "restored from the template"
        );
        Ok(())
    })
    .await
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&mut self, spec: &VmSpec) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::InvalidSpec(
                "this QEMU backend has already started a VM".into(),
            ));
        }
        let sockets = [
            socket_path(&spec.dir, VHOST_VSOCK_SOCKET)?,
            socket_path(&spec.dir, HYBRID_VSOCK_SOCKET)?,
            socket_path(&spec.dir, QMP_SOCKET)?,
        ];
        let result = self.try_start(spec, &sockets).await;
        if let Err(e) = &result {
            tracing::warn!(id = %spec.id, error = %e, "QEMU VM failed to start; cleaning up");
            // Stop with no grace: nothing is running that needs it.
            if let Err(stop_err) = self.stop(Duration::ZERO).await {
                tracing::warn!(id = %spec.id, error = %stop_err, "cleanup after failed start");
            }
            remove_files(&sockets);
        }
        result
    }

    /// Until the agent's console says it serves ttrpc. vhost-device-vsock
    /// 0.3.0 gets the guest memory (SET_MEM_TABLE) a moment before its
    /// vrings, when the guest's vsock driver starts the device; a host
    /// connection in between makes its event handler process the TX ring
    /// before it is ready, `process_tx` fails with IterateQueue
    /// (vhu_vsock.rs, BACKEND_EVENT), and the error ends its only vring
    /// worker thread without a word: no later CONNECT is ever read. Waiting
    /// for the agent's line keeps the shim off the socket until long after
    /// that moment (and saves the attempts refused while nothing listens).
    async fn wait_vsock_ready(&self, limit: Duration) -> bool {
        let Some(running) = &self.running else {
            return true;
        };
        if running.restored {
            return true;
        }
        let mut serving = running.console.agent_serving();
        let waited = tokio::time::timeout(limit, serving.wait_for(|s| *s)).await;
        matches!(waited, Ok(Ok(_)))
    }

    fn vsock_socket(&self) -> PathBuf {
        self.running
            .as_ref()
            .map(|r| r.hybrid_vsock.clone())
            .unwrap_or_default()
    }

    fn pids(&self) -> Vec<u32> {
        match &self.running {
            Some(r) => [&*r.qemu, &r.vhost_vsock]
                .into_iter()
                .filter(|p| p.exited().is_none())
                .map(|p| p.pid())
                .collect(),
            None => Vec::new(),
        }
    }

    async fn wait_exit(&self) -> String {
        match &self.running {
            Some(r) => r.qemu.wait_exit().await,
            None => "not started".to_string(),
        }
    }

    /// Not supported: QEMU is started without hot-plug slots (`-smp N`, no
    /// `maxmem`), so the VM keeps its boot size. The caller keeps the guest
    /// cgroup limits, which still bound the pod.
    async fn resize(&self, _target: VmSize) -> Result<VmSize> {
        Err(Error::Unsupported(
            "resizing a running VM (vCPU and memory hot-plug) with the QEMU backend",
        ))
    }

    async fn stop(&mut self, timeout: Duration) -> Result<()> {
        let Some(running) = &self.running else {
            return Ok(());
        };
        // QEMU first: vhost-device-vsock must outlive its frontend, or QEMU
        // may log vhost-user errors while tearing down.
        let qemu_result = running.qemu.terminate(timeout).await;
        let vsock_result = running.vhost_vsock.terminate(timeout).await;
        remove_files(&running.sockets);
        remove_files(&[running.console.pipe().to_path_buf()]);
        qemu_result.and(vsock_result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_kernel_fails_before_spawning_anything() {
        let dir = tempfile::tempdir().unwrap();
        let spec = VmSpec {
            kernel: dir.path().join("no-kernel"),
            initramfs: dir.path().join("no-initrd"),
            ..VmSpec::for_test(dir.path())
        };
        let mut qemu = Qemu::new("/nonexistent/qemu".into(), "/nonexistent/vv".into());
        let err = qemu.start(&spec).await.unwrap_err();
        assert!(err.to_string().contains("no-kernel"), "{err}");
        assert!(qemu.pids().is_empty());
        qemu.stop(Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn a_netns_that_cannot_be_opened_fails_before_spawning_anything() {
        let dir = tempfile::tempdir().unwrap();
        let spec = VmSpec::for_test(dir.path());
        std::fs::write(&spec.kernel, "").unwrap();
        std::fs::write(&spec.initramfs, "").unwrap();
        let missing = dir.path().join("no-such-netns");
        let spec = VmSpec {
            netns: Some(missing.clone()),
            ..spec
        };
        // Spawning either binary would fail with Error::Spawn instead.
        let mut qemu = Qemu::new("/nonexistent/qemu".into(), "/nonexistent/vv".into());
        let err = qemu.start(&spec).await.unwrap_err();
        assert!(
            matches!(&err, Error::Netns { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("no-such-netns"), "{err}");
        assert!(qemu.pids().is_empty());
        for (_, log) in Qemu::log_files(dir.path()) {
            assert!(!log.exists(), "{} was written", log.display());
        }
    }

    #[tokio::test]
    async fn resize_is_a_typed_unsupported_error() {
        let qemu = Qemu::new("/nonexistent/qemu".into(), "/nonexistent/vv".into());
        let target = VmSize {
            vcpus: 2,
            memory_mib: 1024,
        };
        let err = qemu.resize(target).await.unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("QEMU backend"), "{err}");
    }
}
