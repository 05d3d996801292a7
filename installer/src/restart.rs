//! Restarting containerd after its configuration changed, and only then.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{InstallError, Result};

/// How long the restart command may take.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// `systemctl restart containerd` where the host runs systemd; else
    /// the report says to restart it by hand.
    Auto,
    Never,
    /// A shell command (`sh -c`), e.g. `rc-service containerd restart`.
    Command(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Restarted(String),
    /// Why not, and what to do.
    NotRestarted(String),
}

/// Restarts containerd as `how` says. With a host root other than `/` (the
/// installer's pod), the command runs in the host's mount namespace (that
/// of PID 1: the pod shares the host's PID namespace), so that `systemctl`
/// and the host's own binaries are the ones that run.
pub fn restart(how: &Restart, host_root: &Path) -> Result<Outcome> {
    let command = match how {
        Restart::Never => {
            return Ok(Outcome::NotRestarted(
                "--no-restart: restart containerd yourself so that it loads the change".into(),
            ))
        }
        Restart::Command(c) => c.clone(),
        Restart::Auto if host_root.join("run/systemd/system").is_dir() => {
            "systemctl restart containerd".into()
        }
        Restart::Auto => {
            return Ok(Outcome::NotRestarted(
                "the host does not run systemd: restart containerd yourself (or pass --restart-command) so that it loads the change".into(),
            ))
        }
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&command)
        // Its output goes to ours (the installer's log): a pipe nobody
        // reads while we wait could fill and stall it.
        .stdin(Stdio::null());
    if host_root != Path::new("/") {
        let ns = File::open("/proc/1/ns/mnt").map_err(|e| InstallError::Restart {
            command: command.clone(),
            detail: format!("opening the host's mount namespace (/proc/1/ns/mnt; does the pod have hostPID?): {e}"),
        })?;
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setns, chdir) run, on an fd opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
    }
    let fail = |detail: String| InstallError::Restart {
        command: command.clone(),
        detail,
    };
    let mut child = cmd.spawn().map_err(|e| fail(format!("spawning: {e}")))?;
    let deadline = Instant::now() + RESTART_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("still running after {RESTART_TIMEOUT:?}")));
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Err(fail(format!("waiting: {e}"))),
        }
    };
    if !status.success() {
        return Err(fail(format!("{status}; its output is above")));
    }
    Ok(Outcome::Restarted(command))
}
