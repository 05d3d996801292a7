//! VM templates in the end-to-end tests (`[runtime] templates`;
//! docs/design/0004-vm-templates.md): a private template store turned on
//! in a shim config, and a watch that tells restored VMs from booted ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

use crate::ctr::{add_key, vm_processes, with_key, Setup};

/// How often the watch lists the QEMU processes.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// The `[runtime]` lines that turn templates on, kept in `store`.
fn config_lines(store: &Path) -> String {
    format!("templates = true\ntemplate_dir = \"{}\"", store.display())
}

/// Turns templates on in `s`'s shim config, kept in a new store that lives
/// as long as the returned directory.
pub fn enable(s: &Setup) -> Result<TempDir> {
    let store = tempfile::Builder::new()
        .prefix("clh-templates-")
        .tempdir_in("/tmp")?;
    add_key(&s.config, "runtime", &config_lines(store.path()))?;
    Ok(store)
}

/// A shim config switched between booting pod VMs and restoring them from
/// templates in a store, by rewriting the file before a start (each shim
/// reads it when it starts): a bench compares both in one run.
pub struct ConfigSwitch {
    path: PathBuf,
    boot: String,
    template: String,
}

impl ConfigSwitch {
    /// The switch for the config at `path`, as it is now (booting), with
    /// templates kept in `store`.
    pub fn new(path: &Path, store: &Path) -> Result<Self> {
        let boot = std::fs::read_to_string(path)
            .with_context(|| format!("reading the shim config {}", path.display()))?;
        let template = with_key(&boot, "runtime", &config_lines(store))?;
        Ok(Self {
            path: path.to_path_buf(),
            boot,
            template,
        })
    }

    /// Writes the config that restores (`true`) or boots (`false`).
    pub fn use_templates(&self, on: bool) -> Result<()> {
        let text = if on { &self.template } else { &self.boot };
        std::fs::write(&self.path, text)
            .with_context(|| format!("writing the shim config {}", self.path.display()))
    }
}

/// The templates in `store` that are complete (`<key>/ready`).
pub fn ready(store: &Path) -> Result<Vec<PathBuf>> {
    let mut ready = Vec::new();
    for entry in std::fs::read_dir(store)? {
        let path = entry?.path();
        if path.join("ready").is_file() {
            ready.push(path);
        }
    }
    Ok(ready)
}

/// The QEMU processes under `state_dir` that were restored from a VM
/// template.
pub fn restored_vms(state_dir: &Path) -> Vec<i32> {
    vm_processes("qemu-system-x86_64", state_dir)
        .into_iter()
        .filter(|&pid| is_restored(pid))
        .collect()
}

/// Whether QEMU `pid` was restored from a template (`-incoming`).
fn is_restored(pid: i32) -> bool {
    crate::containerd::cmdline(pid)
        .iter()
        .any(|a| a == "-incoming")
}

/// The pod QEMUs seen under a state dir while it runs, restored and
/// booted. It samples every [`WATCH_EVERY`]: a pod VM lives for seconds at
/// least, so none goes unseen. Template makers run under the template
/// store, not the state dir, and are not counted.
pub struct RestoreWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Seen {
    restored: BTreeSet<i32>,
    booted: BTreeSet<i32>,
}

impl RestoreWatch {
    pub fn start(state_dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (dir, flag, into) = (state_dir.to_path_buf(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for pid in vm_processes("qemu-system-x86_64", &dir) {
                    let mut seen = into.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.restored.contains(&pid) || seen.booted.contains(&pid) {
                        continue;
                    }
                    if is_restored(pid) {
                        seen.restored.insert(pid);
                    } else {
                        seen.booted.insert(pid);
                    }
                }
                std::thread::sleep(WATCH_EVERY);
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops the watch and checks that every pod VM it saw, at least
    /// `min` of them, was restored from a template.
    pub fn all_restored(mut self, min: usize) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        ensure!(
            seen.booted.is_empty() && seen.restored.len() >= min,
            "pod VMs: {} restored from a template (at least {min} expected), booted instead: {:?}",
            seen.restored.len(),
            seen.booted
        );
        Ok(())
    }
}

impl Drop for RestoreWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
