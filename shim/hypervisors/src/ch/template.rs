//! Templates on Cloud Hypervisor (docs/design/0004-vm-templates.md, item
//! 6): a VM booted once without per-pod devices, paused and saved with
//! `vm.snapshot` into a directory ([`save_template`]); a pod's CH started
//! without a VM, given that directory with `vm.restore`, its devices
//! hot-plugged (`vm.add-vsock`, `vm.add-fs`, `vm.add-net`) while the VM is
//! still paused, then `vm.resume` ([`restore`]).
//!
//! The snapshot holds the template's configuration (`config.json`), and a
//! restore reopens the serial console file named there. That name is
//! relative (`console.pipe`, see [`super::template_config`]) and every CH
//! runs in its VM's directory, so a restored CH writes into its own pod's
//! console FIFO, never into the template's directory, and the template may
//! be moved (its build directory renamed) once saved.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::api::{FsConfig, RestoreConfig, VmSnapshotConfig};
use super::client::ApiClient;
use super::{
    check_version, net_config, remaining, remove_socket, template_config, vmm_command,
    vsock_config, wait_for_api_socket, API_TIMEOUT,
};
use crate::console_log::ConsoleLog;
use crate::process::ManagedProcess;
use crate::template_key;
use crate::{socket_path, Error, Result, VmSpec};

/// Files of the template VM in its directory, named apart from a pod VM's
/// so that a template made in a pod's directory would disturb nothing.
const TEMPLATE_API_SOCKET: &str = "template-api.sock";
const TEMPLATE_LOG: &str = "template-vmm.log";

/// The least time CH gets to end after saving, even with the deadline
/// spent: it has nothing left to do but exit.
const MIN_END: Duration = Duration::from_secs(1);

/// Boots `spec` as a template ([`super::template_config`]: no vsock,
/// virtio-fs or NIC; `spec.netns` is not entered), waits for the agent's
/// "serving" console line (the agent is never called: its boot id must
/// stay unread, so that each restore makes its own), pauses the VM,
/// snapshots it into `snapshot_dir` (an absolute path that must not exist
/// yet), and ends CH. Everything it spawned is gone when it returns, on
/// every path, and so is `snapshot_dir` on failure.
pub async fn save_template(binary: &Path, spec: &VmSpec, snapshot_dir: &Path) -> Result<()> {
    let destination_url = file_url(snapshot_dir)?;
    if snapshot_dir.symlink_metadata().is_ok() {
        return Err(Error::InvalidSpec(format!(
            "the template snapshot directory {} exists already",
            snapshot_dir.display()
        )));
    }
    let api_socket = socket_path(&spec.dir, TEMPLATE_API_SOCKET)?;
    remove_socket(&api_socket)?;
    let deadline = Instant::now() + spec.start_timeout;
    // Before CH, which opens its FIFO at vm.create.
    let console = ConsoleLog::start(&spec.dir, &spec.console_log, spec.console_log_max_bytes)?;
    let ch = ManagedProcess::spawn(
        &format!("cloud-hypervisor for template {}", spec.id),
        vmm_command(binary, &api_socket, &spec.dir),
        &spec.dir.join(TEMPLATE_LOG),
    )?;
    let client = ApiClient::new(&api_socket, API_TIMEOUT);
    let what = "Cloud Hypervisor to boot and save the template";
    let saved = ch
        .within(spec.start_timeout, what, async {
            wait_for_api_socket(&ch, &api_socket, remaining(deadline)).await?;
            check_version(&client.ping_within(remaining(deadline)).await?);
            let config = template_config(spec);
            client.create_within(&config, remaining(deadline)).await?;
            client.boot_within(remaining(deadline)).await?;
            let what = "the template's agent to print its serving line on the console";
            console
                .wait_agent_serving(&ch, remaining(deadline), what)
                .await?;
            // CH snapshots only a paused VM.
            client.pause().await?;
            std::fs::create_dir(snapshot_dir).map_err(|source| Error::Io {
                what: "cannot create the template snapshot directory",
                path: snapshot_dir.to_path_buf(),
                source,
            })?;
            let snapshot = VmSnapshotConfig { destination_url };
            client.snapshot(&snapshot, remaining(deadline)).await
        })
        .await;
    if saved.is_ok() {
        // Best effort: SIGTERM follows anyway.
        if let Err(e) = client.shutdown_vmm(remaining(deadline).max(MIN_END)).await {
            tracing::debug!(error = %e, "vmm.shutdown of the template's CH failed");
        }
    }
    let ended = ch.terminate(remaining(deadline).max(MIN_END)).await;
    let removed = remove_socket(&api_socket);
    // Removes the FIFO.
    drop(console);
    if saved.is_err() {
        match std::fs::remove_dir_all(snapshot_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %snapshot_dir.display(), error = %e, "cannot remove a failed template snapshot");
            }
            _ => {}
        }
    }
    saved.and(ended).and(removed)
}

/// What shapes a template of `spec` for the CH `binary`, as text to hash
/// into its key (crate::template_key): the template's configuration (its
/// per-VM paths fixed) and the identity of CH, the kernel and the
/// initramfs, so that a change of any of them makes a new template.
pub fn template_identity(binary: &Path, spec: &VmSpec) -> Result<String> {
    let config = template_config(&template_key::with_fixed_paths(spec));
    let config = serde_json::to_string_pretty(&config).map_err(|source| Error::ApiEncode {
        endpoint: "vm.create (template)",
        source,
    })?;
    template_key::identity(
        config.lines().map(str::to_owned),
        [binary, spec.kernel.as_path(), spec.initramfs.as_path()],
    )
}

/// Restores the template in `snapshot_dir` into the CH just started (it
/// has no VM: no `vm.create`), gives the paused VM the pod's devices as a
/// cold boot's configuration has them (the vsock device on `vsock_socket`
/// with the same cid, `spec.shared_fs`, one virtio-net device per NIC on
/// its tap in the pod's network namespace, where CH already runs), and
/// resumes it: the guest finds the devices hot-plugged. On error the
/// caller stops CH (and may then boot the VM cold).
pub(super) async fn restore(
    client: &ApiClient,
    spec: &VmSpec,
    snapshot_dir: &Path,
    vsock_socket: &Path,
    deadline: Instant,
) -> Result<()> {
    let restore = RestoreConfig {
        source_url: file_url(snapshot_dir)?,
        // Only the pages the snapshot holds get memory; the rest of guest
        // RAM stays unallocated until the guest touches it, as after a
        // cold boot.
        prefault: false,
    };
    client.restore(&restore, remaining(deadline)).await?;
    let timeout = remaining(deadline);
    let plugged = async {
        client.add_vsock(&vsock_config(vsock_socket)).await?;
        if let Some(fs) = &spec.shared_fs {
            let fs = FsConfig::new(fs.tag.clone(), fs.socket.clone());
            client.add_fs(&fs).await?;
        }
        for nic in &spec.nics {
            client.add_net(&net_config(nic)).await?;
        }
        client.resume().await
    };
    tokio::time::timeout(timeout, plugged)
        .await
        .map_err(|_| Error::Timeout {
            what: "Cloud Hypervisor to hot-plug the pod's devices into the restored template"
                .into(),
            timeout,
        })?
}

/// The `file://` URL CH takes for a snapshot directory. CH strips the
/// scheme and uses the rest as a path, relative to its working directory
/// if it is relative and with no decoding, so the path must be absolute
/// and valid UTF-8 (JSON).
pub(crate) fn file_url(dir: &Path) -> Result<String> {
    match dir.to_str() {
        Some(path) if dir.is_absolute() => Ok(format!("file://{path}")),
        _ => Err(Error::InvalidSpec(format!(
            "template snapshot directory {} must be an absolute UTF-8 path",
            dir.display()
        ))),
    }
}
