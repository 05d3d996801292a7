//! A real virtiofsd, started by the shim's own [`Virtiofsd::start`], on a
//! share that sits next to a canary tree the guest must never reach:
//!
//! ```text
//! /tmp/clh-tXXXX/          state root (the share's parent)
//!   share/                 --shared-dir
//!   canary/secret          outside the share
//!   fs.sock, virtiofsd.log
//! ```
//!
//! [`Fixture::run`] always stops virtiofsd, removes the state root and
//! checks that nothing is left (no process, no mount, no file), also when
//! the test body fails or panics.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clh_hypervisor::virtiofsd::Virtiofsd;

use super::FuseFrontend;
use crate::{find_binary, state_root, LeakCheck};

/// One fixture at a time per test binary: the leak check counts every
/// virtiofsd child of this process, so a parallel test's daemon would look
/// like a leak.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bounds each vhost-user and FUSE reply; generous for a loaded 2-core host.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Fixture {
    pub share: PathBuf,
    pub canary: PathBuf,
    /// A name no host path has; what a request creates carries it, so a
    /// stray file is easy to look for.
    pub marker: String,
    virtiofsd: Virtiofsd,
    leak_check: LeakCheck,
    log: PathBuf,
    root: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    /// Creates the tree, lets `prepare` add to the share as host root, and
    /// starts virtiofsd. Needs root: `--sandbox namespace` as root is what
    /// the shim runs, and the tests mknod device nodes.
    pub async fn start(prepare: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the virtiofsd tests need root (the shim runs virtiofsd as root)");
        }
        let turn = ONE_AT_A_TIME.lock().await;
        let root = state_root()?;
        let leak_check = LeakCheck::new(root.path());
        let share = root.path().join("share");
        let canary = root.path().join("canary");
        std::fs::create_dir(&share).context("creating the share")?;
        std::fs::create_dir(&canary).context("creating the canary dir")?;
        std::fs::write(canary.join("secret"), "host only\n").context("writing the canary")?;
        prepare(&share)?;
        let log = root.path().join("virtiofsd.log");
        let virtiofsd = Virtiofsd::start(
            &find_binary("virtiofsd"),
            &share,
            &root.path().join("fs.sock"),
            &log,
            START_TIMEOUT,
        )
        .await
        .context("starting virtiofsd the way the shim does")?;
        let marker = format!(
            "clh-fuse-{}",
            root.path().file_name().map_or_else(
                || std::process::id().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        );
        Ok(Self {
            share,
            canary,
            marker,
            virtiofsd,
            leak_check,
            log,
            root,
            _turn: turn,
        })
    }

    pub fn virtiofsd(&self) -> &Virtiofsd {
        &self.virtiofsd
    }

    /// The share's parent: what `..` at the share root would be on the host.
    pub fn parent(&self) -> &Path {
        self.root.path()
    }

    /// Connects as the guest (virtiofsd accepts one connection only).
    pub fn connect(&self) -> anyhow::Result<FuseFrontend> {
        FuseFrontend::connect(self.virtiofsd.socket(), REPLY_TIMEOUT)
    }

    /// Runs `body`, then tears everything down whatever `body` did and
    /// checks for leftovers; fails with `body`'s failure first (printing any
    /// leftovers), else with the first leftover.
    pub async fn run(mut self, body: impl FnOnce(&Fixture) -> anyhow::Result<()>) {
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&self)));
        let failed = !matches!(outcome, Ok(Ok(())));
        let stopped = self.virtiofsd.stop(STOP_GRACE).await;
        if failed {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- virtiofsd log ---\n{log}--- end of virtiofsd log ---");
        }
        let Fixture {
            root,
            leak_check,
            virtiofsd,
            _turn,
            ..
        } = self;
        drop(virtiofsd);
        let root_path = root.path().to_path_buf();
        let removed = root.close();
        // In a task of its own so that a leak (a panic) is reported without
        // hiding the body's own failure.
        let leaks = tokio::spawn(async move { leak_check.assert_clean().await }).await;
        let left = root_path.exists();
        if failed {
            eprintln!(
                "teardown: stop {stopped:?}, remove {removed:?}, leak check ok: {}, root left: {left}",
                leaks.is_ok()
            );
        }
        match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(Err(e)) => panic!("{e:#}"),
            Ok(Ok(())) => {}
        }
        stopped.expect("virtiofsd and its sandboxed worker stop");
        removed.expect("the state root is removed");
        if let Err(e) = leaks {
            resume_unwind(e.into_panic());
        }
        assert!(!left, "{} is left", root_path.display());
    }
}

/// The host inode number of `path` (not following a final symlink).
pub fn host_ino(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).map_or(0, |m| m.ino())
}

/// Every entry under `dir` with what identifies it (inode, mode, owner,
/// size), to compare before and after a test.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, u32, u32, u32, u64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if m.is_dir() {
                    todo.push(path.clone());
                }
                out.insert(path, (m.ino(), m.mode(), m.uid(), m.gid(), m.size()));
            }
        }
    }
    out
}
