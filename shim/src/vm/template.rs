//! The template store (docs/design/0004-vm-templates.md): one template
//! per key (QEMU's migration file or Cloud Hypervisor's snapshot
//! directory) under `[runtime] template_dir`, made by the first pod
//! that needs it while others wait on its lock, and discarded when a
//! restore from it fails (that pod then boots, and the next one makes a
//! new template).
//!
//! Layout: `<dir>/<key>/snapshot` (the saved state: a file or a directory), `<key>/identity`
//! (what the key hashes), `<key>/ready` (written last: a directory without
//! it is incomplete), `<key>.lock` (the flock of whoever makes it),
//! `<key>.build/` (the one being made).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clh_hypervisor::template_key::input_records_hold;
use clh_hypervisor::VmSpec;
use clh_hypervisor::{ch, qemu, Backend};
use sha2::{Digest, Sha256};

use super::leftovers::flock_exclusive_within;
use super::VmOptions;

/// The template to restore `spec` from, made now if there is none; `None`
/// (with a warning saying why) when it cannot be had, and the pod boots.
pub(super) async fn restore_source(dir: &Path, opts: &VmOptions, spec: &VmSpec) -> Option<PathBuf> {
    match ensure(dir, opts, spec).await {
        Ok(snapshot) => Some(snapshot),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "no VM template; booting the pod's VM instead"
            );
            None
        }
    }
}

/// Makes the template that pods started with `opts` restore from, unless
/// it is there already, and returns its snapshot (`containerd-shim-clh-v2
/// template make`: the first pod then restores at once rather than make
/// it). An error says why there is none.
pub async fn make_ahead(opts: &VmOptions) -> Result<PathBuf> {
    let Some(dir) = &opts.templates else {
        anyhow::bail!("templates are off: set [runtime] templates = true in the configuration");
    };
    // What the key hashes has no per-VM path in it: any directory will do.
    let spec = super::steps::vm_spec("ahead", dir, opts);
    ensure(dir, opts, &spec).await
}

/// Removes the template of `snapshot` after a restore from it failed, so
/// that the next pod makes a new one.
pub(super) fn discard(snapshot: &Path) {
    let Some(template) = snapshot.parent() else {
        return;
    };
    if let Err(e) = remove_template(template) {
        tracing::warn!(template = %template.display(), error = %e, "cannot remove a failed template");
    }
}

/// Removes the template (or build) directory `template`, its readiness
/// first: a concurrent pod no longer takes it.
fn remove_template(template: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(template.join("ready"));
    std::fs::remove_dir_all(template)
}

async fn ensure(dir: &Path, opts: &VmOptions, spec: &VmSpec) -> Result<PathBuf> {
    let identity = identity(opts, spec)?;
    let key = hex(&Sha256::digest(identity.as_bytes())[..16]);
    let template = dir.join(&key);
    let snapshot = template.join("snapshot");
    if template.join("ready").is_file() {
        return Ok(snapshot);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Making one takes a boot; whoever waits for it waits as long.
    let wait = opts.vmm_start_timeout + opts.agent_timeout;
    let _lock = lock(&dir.join(format!("{key}.lock")), wait).await?;
    if template.join("ready").is_file() {
        return Ok(snapshot);
    }
    let build = dir.join(format!("{key}.build"));
    // Left by a maker that died: nobody else holds the lock.
    let _ = std::fs::remove_dir_all(&build);
    let _ = std::fs::remove_dir_all(&template);
    std::fs::create_dir(&build).with_context(|| format!("creating {}", build.display()))?;
    let made = async {
        let template_spec = VmSpec {
            id: format!("template-{key}"),
            dir: build.clone(),
            console_log: build.join("console.log"),
            shared_fs: None,
            nics: Vec::new(),
            netns: None,
            restore_from: None,
            start_timeout: wait,
            ..spec.clone()
        };
        save(opts, &template_spec, &build.join("snapshot"))
            .await
            .context("booting and saving the template VM")?;
        std::fs::write(build.join("identity"), &identity)?;
        std::fs::rename(&build, &template)
            .with_context(|| format!("moving {} into place", build.display()))?;
        std::fs::write(template.join("ready"), b"")?;
        tracing::info!(template = %template.display(), "made a VM template");
        remove_stale(dir, &key);
        anyhow::Ok(())
    }
    .await;
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&build);
    }
    made.map(|()| snapshot)
}

/// What the key of `spec`'s template hashes, for the configured backend.
fn identity(opts: &VmOptions, spec: &VmSpec) -> clh_hypervisor::Result<String> {
    match opts.backend {
        Backend::Qemu => qemu::template_identity(&opts.binaries.qemu, spec),
        Backend::CloudHypervisor => ch::template_identity(&opts.binaries.cloud_hypervisor, spec),
    }
}

/// Boots `spec` as a template and saves it to `snapshot`: QEMU's
/// migration file, or Cloud Hypervisor's snapshot directory.
async fn save(opts: &VmOptions, spec: &VmSpec, snapshot: &Path) -> clh_hypervisor::Result<()> {
    match opts.backend {
        Backend::Qemu => qemu::save_template(&opts.binaries.qemu, spec, snapshot).await,
        Backend::CloudHypervisor => {
            ch::save_template(&opts.binaries.cloud_hypervisor, spec, snapshot).await
        }
    }
}

/// Removes the templates in `dir`, other than `keep`, whose input files
/// (QEMU, firmware, kernel, initramfs) changed since they were made: no
/// pod can choose them again, their key is gone. Also the build directory
/// of a maker that died, when nobody holds its lock. Called when a new
/// template was made, which is when inputs change. A pod that chose a
/// template just before falls back to a boot if its file is gone.
fn remove_stale(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name == keep || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let stale = if let Some(key) = name.strip_suffix(".build") {
            lock_is_free(&dir.join(format!("{key}.lock")))
        } else {
            let identity = std::fs::read_to_string(path.join("identity")).unwrap_or_default();
            !input_records_hold(&identity)
        };
        if !stale {
            continue;
        }
        match remove_template(&path) {
            Ok(()) => tracing::info!(template = %path.display(), "removed a stale VM template"),
            Err(e) => {
                tracing::warn!(template = %path.display(), error = %e, "cannot remove a stale VM template")
            }
        }
    }
}

/// Whether nobody holds the flock on `path` (a missing file: nobody).
fn lock_is_free(path: &Path) -> bool {
    std::fs::File::open(path).map_or(true, |file| {
        flock_exclusive_within(&file, Duration::ZERO).is_ok()
    })
}

/// An exclusive flock on `path`, waited for up to `wait`. Held until the
/// file is dropped.
async fn lock(path: &Path, wait: Duration) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let taken =
        tokio::task::spawn_blocking(move || flock_exclusive_within(&file, wait).map(|()| file))
            .await
            .context("the template lock's waiting thread")?;
    taken.with_context(|| format!("waiting {wait:?} for the template lock {}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
