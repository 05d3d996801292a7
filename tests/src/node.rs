//! The node installer's test kit (tests/tests/node_install.rs,
//! node_deploy.rs): payloads laid out as `make node-payload` makes them,
//! file listings of a scratch host root, the static installer.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::containerd::{check, PrivateContainerd};
use crate::GuestImage;

pub const SHIM: &str = "containerd-shim-clh-v2";

/// A payload as `make node-payload` lays it out, from the built shim and
/// guest image and `config` as the shim configuration.
pub fn payload(dir: &Path, shim: &Path, image: &GuestImage, config: &str) -> Result<PathBuf> {
    for sub in ["bin", "share/clh-shim", "etc/clh-shim"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::copy(shim, dir.join("bin").join(SHIM))?;
    let bins = crate::binaries();
    for (from, name) in [
        (&bins.virtiofsd, "virtiofsd"),
        (&bins.vhost_device_vsock, "vhost-device-vsock"),
    ] {
        fs::copy(from, dir.join("bin").join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    for (from, name) in [
        (&image.vmlinux, "vmlinux"),
        (&image.vmlinuz, "vmlinuz"),
        (&image.initramfs, "initramfs.cpio.gz"),
    ] {
        fs::copy(from, dir.join("share/clh-shim").join(name))?;
    }
    fs::write(dir.join("etc/clh-shim/config.toml"), config)?;
    Ok(dir.to_path_buf())
}

/// Every file and directory under `root`, relative, sorted.
pub fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    list(root, root, &mut out);
    out.sort();
    out
}

fn list(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap_or(&p).display().to_string());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            list(root, &p, out);
        }
    }
}

/// Waits (bounded) until the log of a detached `ctr run` holds `line`.
pub fn wait_for_log(log: &Path, line: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let said = fs::read_to_string(log).unwrap_or_default();
        if said.contains(line) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no {line:?} within {timeout:?} in {}:\n{said}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends the task `id` SIGTERM, as the kubelet stops a pod, waits
/// (bounded) until it has stopped, and deletes it and its container.
pub fn terminate(ctd: &PrivateContainerd, id: &str) -> Result<()> {
    check(
        &ctd.ctr(&["tasks", "kill", "-s", "SIGTERM", id])?,
        "ctr tasks kill",
    )?;
    crate::ctr::wait_status(ctd, id, "STOPPED", Duration::from_secs(30))?;
    check(&ctd.ctr(&["tasks", "delete", id])?, "ctr tasks delete")?;
    check(&ctd.ctr(&["containers", "rm", id])?, "ctr containers rm")
}

/// The static clh-install `make installer` builds (the image has no libc).
pub fn static_installer() -> Result<PathBuf> {
    let root = crate::ctr::workspace();
    let status = Command::new("make")
        .arg("-C")
        .arg(&root)
        .arg("installer")
        .status()?;
    ensure!(status.success(), "make installer: {status}");
    Ok(root.join("target/x86_64-unknown-linux-gnu/release/clh-install"))
}
