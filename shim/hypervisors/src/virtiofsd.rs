//! virtiofsd: one sandboxed daemon per VM, serving the VM's shared directory
//! as a vhost-user-fs backend.
//!
//! The command line is fixed here and takes nothing a pod can influence:
//! only the shared directory and socket path, both chosen by the shim under
//! its own state directory (GHSA-rr59-xxvx-96qr: extra arguments from pod
//! annotations let a pod serve the host root).
//!
//! - `--sandbox namespace`: pivot_root into the shared directory in new mount,
//!   pid and net namespaces, so guest-supplied names (`..`, absolute symlink
//!   targets) cannot reach the host file system (GHSA-2gv2-cffp-j227).
//! - `--seccomp kill`: any syscall outside virtiofsd's allow-list kills it.
//! - `--cache auto`: the shared directory will hold container root file
//!   systems, volumes and ConfigMaps that the host may change under the
//!   guest. `auto` gives close-to-open consistency with a short metadata
//!   timeout, so host updates become visible, while still letting the guest
//!   page cache serve repeated reads of binaries and libraries (`never`
//!   would send every read of every executable to the host, which is very
//!   slow under TCG; `always` could serve stale ConfigMap contents forever).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::process::ManagedProcess;
use crate::wait::wait_until;
use crate::{Error, Result};

/// The name the shim gives virtiofsd's socket in the VM directory (see
/// [`crate::check_vm_dir`]).
pub const SOCKET_NAME: &str = "virtiofsd.sock";

/// The `__SO_ACCEPTCON` flag of `/proc/net/unix`: the socket is listening.
const SO_ACCEPTCON: u32 = 0x0001_0000;

/// A running virtiofsd. Killed on drop; [`Virtiofsd::stop`] stops it
/// gracefully and removes its socket.
pub struct Virtiofsd {
    process: ManagedProcess,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd serving `shared_dir` on the vhost-user socket
    /// `socket`, logging to `log`, and waits up to `timeout` for the socket
    /// to listen. If virtiofsd exits first, the error carries its log tail.
    pub async fn start(
        binary: &Path,
        shared_dir: &Path,
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        if !shared_dir.is_dir() {
            return Err(Error::InvalidSpec(format!(
                "virtiofsd shared directory {} does not exist or is not a directory",
                shared_dir.display()
            )));
        }
        let mut cmd = Command::new(binary);
        cmd.arg("--shared-dir")
            .arg(shared_dir)
            .arg("--socket-path")
            .arg(socket)
            .args(["--sandbox", "namespace", "--seccomp", "kill"])
            // Guest root must not make host device nodes (virtiofsd would
            // not open them, but any host process could).
            .arg("--modcaps=-mknod")
            .args(["--cache", "auto"]);
        let process = ManagedProcess::spawn("virtiofsd", cmd, log)?;
        let virtiofsd = Self {
            process,
            socket: socket.to_path_buf(),
        };
        // Probe without connecting: virtiofsd serves exactly one frontend
        // and exits when that connection closes, so a test connection would
        // kill it.
        let ready = wait_until("virtiofsd to listen on its socket", timeout, || async {
            if virtiofsd.process.exited().is_some() {
                return Some(Err(virtiofsd.process.exited_early()));
            }
            socket_is_listening(socket).then_some(Ok(()))
        })
        .await
        .and_then(|r| r);
        if let Err(e) = ready {
            // Drop kills it; the socket may have been created already.
            let _ = virtiofsd.process.kill().await;
            virtiofsd.remove_socket();
            return Err(match e {
                Error::Timeout { what, timeout } => Error::Timeout {
                    what: format!(
                        "{what} (last lines of its log:\n{})",
                        virtiofsd.process.log_tail(20)
                    ),
                    timeout,
                },
                other => other,
            });
        }
        Ok(virtiofsd)
    }

    /// The vhost-user socket to hand to the VMM.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `Some(how it ended)` once virtiofsd has exited.
    pub fn exited(&self) -> Option<String> {
        self.process.exited()
    }

    /// Resolves when virtiofsd has exited, with how it ended.
    pub async fn wait_exit(&self) -> String {
        self.process.wait_exit().await
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; removes the socket.
    /// Idempotent. SIGTERM first because virtiofsd then takes its sandboxed
    /// child down with it and reaps it.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        // With `--sandbox namespace` virtiofsd forks its worker into new
        // namespaces; the worker dies with its parent, but asynchronously.
        // Note its pid first, so stop returns only once it is gone too.
        let workers = child_pids(self.process.pid());
        let result = self.process.terminate(grace).await;
        let workers_gone = wait_gone(&workers, grace).await;
        self.remove_socket();
        result.and(workers_gone)
    }

    /// Removes the socket and the `<socket>.pid` lock file virtiofsd
    /// creates next to it.
    fn remove_socket(&self) {
        let mut pid_file = self.socket.clone().into_os_string();
        pid_file.push(".pid");
        for path in [self.socket.as_path(), Path::new(&pid_file)] {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove virtiofsd socket file");
                }
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        // The process is SIGKILLed by ManagedProcess's drop; the socket file
        // would otherwise outlive it.
        self.remove_socket();
    }
}

/// Whether a Unix socket bound at `path` is listening, read from
/// `/proc/net/unix` so that probing never connects to (and so never
/// disturbs) a vhost-user backend that serves a single connection.
pub fn socket_is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let Some(path) = path.to_str() else {
        return false;
    };
    listening_in_table(&table, path)
}

fn listening_in_table(table: &str, path: &str) -> bool {
    // Columns: Num RefCount Protocol Flags Type St Inode [Path]
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

/// The pids of `pid`'s children (`/proc/<pid>/task/*/children`).
fn child_pids(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Whether `pid` still runs: it exists and is not a zombie (a zombie has
/// released everything; reaping it is its new parent's business).
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits up to `grace` for `pids` to end, then SIGKILLs what is left and
/// waits a little more.
async fn wait_gone(pids: &[i32], grace: Duration) -> Result<()> {
    let all_gone = || async { pids.iter().all(|&p| !is_running(p)).then_some(()) };
    if wait_until("virtiofsd's sandboxed worker to exit", grace, all_gone)
        .await
        .is_ok()
    {
        return Ok(());
    }
    for &pid in pids.iter().filter(|&&p| is_running(p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    wait_until(
        "virtiofsd's sandboxed worker to die after SIGKILL",
        Duration::from_secs(5),
        all_gone,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /run/a.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31338 /run/b.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31339
";

    #[test]
    fn only_listening_sockets_count() {
        assert!(listening_in_table(TABLE, "/run/a.sock"));
        assert!(!listening_in_table(TABLE, "/run/b.sock"));
        assert!(!listening_in_table(TABLE, "/run/c.sock"));
    }

    #[tokio::test]
    async fn a_real_listener_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        assert!(!socket_is_listening(&path));
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        assert!(socket_is_listening(&path));
    }

    #[tokio::test]
    async fn a_missing_shared_dir_is_refused_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let err = Virtiofsd::start(
            Path::new("/bin/true"),
            &dir.path().join("nope"),
            &dir.path().join("fs.sock"),
            &dir.path().join("log"),
            Duration::from_secs(1),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn a_daemon_that_exits_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-virtiofsd");
        std::fs::write(&fake, "#!/bin/sh\necho 'bad option' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let started = std::time::Instant::now();
        let err = Virtiofsd::start(
            &fake,
            dir.path(),
            &dir.path().join("fs.sock"),
            &dir.path().join("log"),
            Duration::from_secs(10),
        )
        .await
        .err()
        .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("exit code 3") && msg.contains("bad option"),
            "{msg}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
