//! Templates (docs/design/0004-vm-templates.md): a VM booted once without
//! per-pod devices and saved to a file with QEMU's migration, and a pod's
//! QEMU restored from that file, its devices hot-plugged over QMP.
//!
//! The file uses the `mapped-ram` capability: guest RAM at fixed offsets,
//! only the pages the guest wrote, so a 512 MiB guest saves as about
//! 50 MiB of sparse file, and a restore reads just those.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;
use tokio::time::Instant;

use super::args::{nic_properties, template_args, Layout, Properties};
use super::qmp::Client;
use crate::console_log::ConsoleLog;
use crate::process::ManagedProcess;
use crate::template_key;
use crate::{socket_path, Error, Nic, Result, SharedFs, VmSpec};

const TEMPLATE_QMP_SOCKET: &str = "template-qmp.sock";
const TEMPLATE_LOG: &str = "template-qemu.log";
/// The QOM path of a hot-plugged virtio device's backend, by device id.
const VSOCK_ID: &str = "vsock0";
const FS_ID: &str = "fs0";
/// How often a migration's or a device's state is asked for.
const POLL: Duration = Duration::from_millis(5);

/// Boots `spec` without per-pod devices (its `shared_fs` and `nics` are
/// ignored), waits for the agent's "serving" console line (never a
/// `Check`: the boot id must stay unread, so that each restore makes its
/// own), then stops the guest and saves it to `snapshot`, and ends QEMU.
/// Everything it spawned is gone when it returns, on every path.
pub async fn save_template(qemu_binary: &Path, spec: &VmSpec, snapshot: &Path) -> Result<()> {
    check_uri_path(snapshot)?;
    let deadline = Instant::now() + spec.start_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let qmp_socket = socket_path(&spec.dir, TEMPLATE_QMP_SOCKET)?;
    let firmware = super::fast_firmware(qemu_binary);
    let args = template_args(spec, &qmp_socket, firmware.as_deref(), Layout::Template)?;
    let console = ConsoleLog::start(&spec.dir, &spec.console_log, spec.console_log_max_bytes)?;
    let mut cmd = Command::new(qemu_binary);
    cmd.args(&args);
    let qemu = ManagedProcess::spawn("qemu-system-x86_64", cmd, &spec.dir.join(TEMPLATE_LOG))?;
    let saved = async {
        let mut qmp = Client::connect(&qmp_socket, &qemu, left()).await?;
        let what = "the template's agent to serve";
        console.wait_agent_serving(&qemu, left(), what).await?;
        qmp.execute("stop", Value::Null).await?;
        set_mapped_ram(&mut qmp).await?;
        let uri = format!("file:{}", snapshot.display());
        qmp.execute("migrate", json!({ "uri": uri })).await?;
        qemu.within(
            left(),
            "QEMU to save the template",
            migration_done(&mut qmp),
        )
        .await?;
        qmp.execute("quit", Value::Null).await.map(|_| ())
    }
    .await;
    let ended = qemu.terminate(left().max(Duration::from_secs(1))).await;
    let _ = std::fs::remove_file(&qmp_socket);
    let _ = std::fs::remove_file(console.pipe());
    if saved.is_err() {
        let _ = std::fs::remove_file(snapshot);
    }
    saved.and(ended)
}

/// What shapes a template of `spec` for `qemu_binary` (the path the shim
/// resolved, `host::binaries`), as text to hash into its key: the
/// template's command line (its per-VM paths and name fixed) and the
/// identity (path, size, mtime, inode) of the QEMU binary, the firmware,
/// the kernel and the initramfs, so that a change of any of them makes a
/// new template. A file that cannot be read is an error.
pub fn template_identity(qemu_binary: &Path, spec: &VmSpec) -> Result<String> {
    let firmware = super::fast_firmware(qemu_binary);
    let args = template_args(
        &template_key::with_fixed_paths(spec),
        Path::new("/template/qmp.sock"),
        firmware.as_deref(),
        Layout::Template,
    )?;
    let inputs = [
        Some(qemu_binary),
        firmware.as_deref(),
        Some(&spec.kernel),
        Some(&spec.initramfs),
    ];
    template_key::identity(
        args.iter().map(|a| a.to_string_lossy().into_owned()),
        inputs.into_iter().flatten(),
    )
}

/// After `-incoming defer`: loads `snapshot` and lets the guest run.
pub(crate) async fn load(qmp: &mut Client, snapshot: &Path) -> Result<()> {
    check_uri_path(snapshot)?;
    set_mapped_ram(qmp).await?;
    let uri = format!("file:{}", snapshot.display());
    qmp.execute("migrate-incoming", json!({ "uri": uri }))
        .await?;
    migration_done(qmp).await?;
    // QEMU may already run the guest once the state is in (autostart).
    if qmp.status().await? != "running" {
        qmp.execute("cont", Value::Null).await?;
    }
    Ok(())
}

/// Hot-plugs the vsock device on `vhost_socket` (vhost-device-vsock's).
/// The guest's driver starts it later ([`wait_plugged`]): a host
/// connection before that ends vhost-device-vsock 0.3.0's worker thread
/// (`Qemu::wait_vsock_ready`).
pub(crate) async fn plug_vsock(qmp: &mut Client, vhost_socket: &Path) -> Result<()> {
    add_socket_chardev(qmp, "vsock", vhost_socket).await?;
    qmp.execute(
        "device_add",
        json!({ "driver": "vhost-user-vsock-pci", "chardev": "vsock", "id": VSOCK_ID }),
    )
    .await
    .map(|_| ())
}

/// Until the guest's drivers run the vsock device and the first `nics`
/// NICs (`DRIVER_OK`). Waited for after all are added, so that the guest
/// takes them in one round of hot-plug handling.
pub(crate) async fn wait_plugged(qmp: &mut Client, nics: usize) -> Result<()> {
    wait_driver_ok(qmp, VSOCK_ID).await?;
    for index in 0..nics {
        wait_driver_ok(qmp, &nic_id(index)).await?;
    }
    Ok(())
}

fn nic_id(index: usize) -> String {
    format!("nic{index}")
}

/// Hot-plugs the virtio-fs device of `fs`.
pub(crate) async fn plug_fs(qmp: &mut Client, fs: &SharedFs) -> Result<()> {
    add_socket_chardev(qmp, "virtiofs", &fs.socket).await?;
    qmp.execute(
        "device_add",
        json!({ "driver": "vhost-user-fs-pci", "chardev": "virtiofs", "tag": fs.tag, "id": FS_ID }),
    )
    .await
    .map(|_| ())
}

/// Hot-plugs NIC number `index`: its tap (opened by name in QEMU's network
/// namespace) and its virtio-net device, with the properties it has at boot
/// (`args::nic_properties`); [`wait_plugged`] waits for its driver (the
/// agent then finds it by MAC).
pub(crate) async fn plug_nic(qmp: &mut Client, index: usize, nic: &Nic) -> Result<()> {
    let (netdev, mut device) = nic_properties(index, nic);
    device.push(("id", json!(nic_id(index))));
    let object = |properties: Properties| {
        Value::Object(
            properties
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    };
    qmp.execute("netdev_add", object(netdev)).await?;
    qmp.execute("device_add", object(device)).await.map(|_| ())
}

async fn set_mapped_ram(qmp: &mut Client) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "mapped-ram", "state": true }] }),
    )
    .await
    .map(|_| ())
}

/// Until `query-migrate` says completed; a failed migration is an error
/// with QEMU's reason.
async fn migration_done(qmp: &mut Client) -> Result<()> {
    loop {
        let state = qmp.execute("query-migrate", Value::Null).await?;
        match state["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(Error::Qmp(format!(
                    "migration {}: {}",
                    state["status"],
                    state["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

async fn add_socket_chardev(qmp: &mut Client, id: &str, path: &Path) -> Result<()> {
    let backend = json!({
        "type": "socket",
        "data": { "addr": { "type": "unix", "data": { "path": path } }, "server": false },
    });
    qmp.execute("chardev-add", json!({ "id": id, "backend": backend }))
        .await
        .map(|_| ())
}

async fn wait_driver_ok(qmp: &mut Client, id: &str) -> Result<()> {
    let path = format!("/machine/peripheral/{id}/virtio-backend");
    loop {
        let status = qmp
            .execute("x-query-virtio-status", json!({ "path": path }))
            .await?;
        if status["status"].to_string().contains("DRIVER_OK") {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A migration URI is `file:<path>[,offset=N]`: no comma in the path.
fn check_uri_path(path: &Path) -> Result<()> {
    if path.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(Error::InvalidSpec(format!(
            "template file {} contains a comma, which QEMU would read as an option separator",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of a template changes with the kernel, the initramfs and
    /// the VM's size, not with the per-pod devices a restore hot-plugs.
    #[test]
    fn the_identity_follows_the_inputs_and_not_the_pod() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let qemu = file("qemu", "q");
        let spec = VmSpec {
            kernel: file("vmlinuz", "k1"),
            initramfs: file("initramfs", "i1"),
            memory_mib: 256,
            ..VmSpec::for_test(dir.path())
        };
        let identity = |spec: &VmSpec| template_identity(&qemu, spec).unwrap();
        let before = identity(&spec);
        let pod = VmSpec {
            id: "another-pod".into(),
            shared_fs: Some(crate::SharedFs {
                socket: dir.path().join("fs.sock"),
                tag: "clh-shared".into(),
            }),
            ..spec.clone()
        };
        assert_eq!(identity(&pod), before, "per-pod devices and names");
        let bigger = VmSpec {
            memory_mib: 512,
            ..spec.clone()
        };
        assert_ne!(identity(&bigger), before, "size");
        std::fs::write(&spec.kernel, "k2, longer").unwrap();
        let after_kernel = identity(&spec);
        assert_ne!(after_kernel, before, "kernel");
        std::fs::write(&spec.initramfs, "i2, longer").unwrap();
        assert_ne!(identity(&spec), after_kernel, "initramfs");
    }
}
