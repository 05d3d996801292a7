//! Supervision of the host processes a VM is made of (VMM, virtiofsd,
//! vhost-device-vsock).
//!
//! A [`ManagedProcess`] owns its child: one reaper task waits for it and is
//! the only place that sends it signals, so a signal can never reach a
//! recycled pid. The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with
//! the shim even when the shim is SIGKILLed, and is killed when its
//! `ManagedProcess` is dropped.
//!
//! A process can be started in another network namespace
//! ([`ManagedProcess::spawn_in`] with a [`NetNs`]): the VMM runs in the
//! pod's, where the shim made its taps. Only the network namespace changes;
//! the mount namespace is the shim's, so Unix sockets bound by path (API,
//! vsock, vhost-user, QMP) connect across it as before.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use crate::{Error, Result};

/// How long a process may take to die after SIGKILL before we give up
/// waiting (it is then a zombie of ours, not a leak of the VM).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// An open network namespace file (`/var/run/netns/<name>`, or any
/// `/proc/<pid>/ns/net`) to start processes in.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: PathBuf,
}

impl NetNs {
    /// Opens `path` (`O_RDONLY|O_CLOEXEC`: the child's copy closes at
    /// exec) and checks that it is a network namespace. An [`Error::Netns`]
    /// naming `path` otherwise, so that a wrong path fails before anything
    /// is spawned rather than in a forked child.
    pub fn open(path: &Path) -> Result<Self> {
        let error = |source| Error::Netns {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(error)?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only queries the
        // descriptor, which `file` keeps open for the call.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if nstype != libc::CLONE_NEWNET {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a network namespace",
            )));
        }
        Ok(Self {
            fd: file.into(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub struct ManagedProcess {
    name: String,
    pid: u32,
    log: PathBuf,
    signals: mpsc::UnboundedSender<Signal>,
    exit: watch::Receiver<Option<String>>,
}

impl ManagedProcess {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr appended
    /// to `log`. `name` is what error messages call the process. It runs in
    /// the shim's own namespaces.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Result<Self> {
        Self::spawn_in(name, cmd, log, None)
    }

    /// [`ManagedProcess::spawn`], with the child moved into `netns` (when
    /// given) between fork and exec.
    pub fn spawn_in(
        name: &str,
        mut cmd: Command,
        log: &Path,
        netns: Option<&NetNs>,
    ) -> Result<Self> {
        let io_err = |source| Error::Io {
            what: "cannot open process log",
            path: log.to_path_buf(),
            source,
        };
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .map_err(io_err)?;
        let err = out.try_clone().map_err(io_err)?;
        let program = PathBuf::from(cmd.as_std().get_program());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // Stays open (borrowed from `netns`) until `spawn` has returned.
        let netns_fd: Option<RawFd> = netns.map(|ns| ns.fd.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec; it only
        // calls prctl(2) and setns(2), plain system calls that are
        // async-signal-safe, and allocates nothing (an OS error is stored
        // inline).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: program,
            source,
        })?;
        let pid = child.id().ok_or_else(|| Error::ExitedEarly {
            what: name.to_string(),
            status: "reaped before its pid was read".into(),
            log_tail: String::new(),
        })?;

        let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<Signal>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let task_name = name.to_string();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some(signal) = sig_rx.recv() => {
                        // child.id() is None once reaped, and only this task reaps.
                        if let Some(pid) = child.id() {
                            let pid = nix::unistd::Pid::from_raw(pid as i32);
                            if let Err(e) = nix::sys::signal::kill(pid, signal) {
                                tracing::warn!(process = %task_name, %signal, error = %e, "signal failed");
                            }
                        }
                    }
                }
            };
            let description = describe_exit(status);
            tracing::debug!(process = %task_name, pid, exit = %description, "process exited");
            let _ = exit_tx.send(Some(description));
        });

        Ok(Self {
            name: name.to_string(),
            pid,
            log: log.to_path_buf(),
            signals: sig_tx,
            exit: exit_rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Some(how it ended)` once the process has exited.
    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Resolves when the process has exited.
    pub async fn wait_exit(&self) -> String {
        let mut rx = self.exit.clone();
        let result = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match result {
            Ok(v) => v.unwrap_or_default(),
            // The reaper task is gone: the runtime is shutting down and the
            // child was killed on drop.
            Err(_) => "killed (supervisor gone)".to_string(),
        }
    }

    /// Sends `signal` (ignored once the process has exited).
    pub fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }

    /// SIGTERM, up to `grace` for the process to exit, then SIGKILL.
    pub async fn terminate(&self, grace: Duration) -> Result<()> {
        if self.exited().is_some() {
            return Ok(());
        }
        self.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.wait_exit()).await.is_ok() {
            return Ok(());
        }
        self.kill().await
    }

    /// SIGKILL, then waits (bounded) for the process to be reaped.
    pub async fn kill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL);
        tokio::time::timeout(KILL_WAIT, self.wait_exit())
            .await
            .map(|_| ())
            .map_err(|_| Error::Timeout {
                what: format!("{} (pid {}) to die after SIGKILL", self.name, self.pid),
                timeout: KILL_WAIT,
            })
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The error to report when the process ended while we still needed it.
    pub fn exited_early(&self) -> Error {
        Error::ExitedEarly {
            what: format!("{} (pid {})", self.name, self.pid),
            status: self.exited().unwrap_or_else(|| "still running".into()),
            log_tail: self.log_tail(20),
        }
    }

    /// Runs `talk` (a conversation with this process, its API or QMP) for
    /// at most `timeout`; a timeout or an error while the process has
    /// exited is reported as its early exit, with its log, which says more
    /// than a refused connection.
    pub async fn within<T>(
        &self,
        timeout: Duration,
        what: &str,
        talk: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(timeout, talk).await {
            Ok(result) => result.map_err(|e| {
                if self.exited().is_some() {
                    self.exited_early()
                } else {
                    e
                }
            }),
            Err(_) if self.exited().is_some() => Err(self.exited_early()),
            Err(_) => Err(Error::Timeout {
                what: what.into(),
                timeout,
            }),
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// The last `lines` lines of a text file; empty if it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn terminate_escalates_to_sigkill_and_reports_how_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo started; while :; do sleep 1; done",
        ]);
        let p = ManagedProcess::spawn("stubborn", cmd, &dir.path().join("log")).unwrap();
        crate::wait::wait_until("log line", Duration::from_secs(5), || async {
            p.log_tail(1).contains("started").then_some(())
        })
        .await
        .unwrap();
        p.terminate(Duration::from_millis(100)).await.unwrap();
        assert_eq!(p.exited().as_deref(), Some("killed by SIGKILL"));
    }

    #[tokio::test]
    async fn spawn_of_a_missing_binary_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = ManagedProcess::spawn(
            "ghost",
            Command::new("/nonexistent/ghost"),
            &dir.path().join("log"),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/ghost"), "{err}");
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let p = ManagedProcess::spawn("sleeper", cmd, &dir.path().join("log")).unwrap();
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        let mut exit = p.exit.clone();
        drop(p);
        tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "process still exists"
        );
    }

    /// A network namespace made for one test: a thread unshares its own
    /// network namespace and bind-mounts it onto an empty file, which keeps
    /// it alive after the thread ends. Unmounted on drop.
    struct TestNetns {
        dir: tempfile::TempDir,
    }

    impl TestNetns {
        /// `Err(why)` where this cannot be done (not root, no mounts).
        fn new() -> std::result::Result<Self, String> {
            if !nix::unistd::geteuid().is_root() {
                return Err("making a network namespace needs root".into());
            }
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let file = dir.path().join("netns");
            std::fs::File::create(&file).map_err(|e| e.to_string())?;
            let target = file.clone();
            std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("bind-mounting the namespace: {e}"))
            })
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())??;
            Ok(Self { dir })
        }

        fn path(&self) -> PathBuf {
            self.dir.path().join("netns")
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            if let Err(e) = nix::mount::umount2(&self.path(), nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cannot unmount {}: {e}", self.path().display());
            }
        }
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .ino()
    }

    #[tokio::test]
    async fn a_process_spawned_in_a_netns_runs_there() {
        let netns = match TestNetns::new() {
            Ok(netns) => netns,
            Err(why) => {
                clh_test_skip::skip(&why);
                return;
            }
        };
        let ns = NetNs::open(&netns.path()).unwrap();
        assert_eq!(ns.path(), netns.path());
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let inside =
            ManagedProcess::spawn_in("in-netns", cmd, &dir.path().join("log"), Some(&ns)).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let outside = ManagedProcess::spawn("outside", cmd, &dir.path().join("log2")).unwrap();

        let ns_of = |p: &ManagedProcess| inode(Path::new(&format!("/proc/{}/ns/net", p.pid())));
        let ours = inode(Path::new("/proc/self/ns/net"));
        let pod = inode(&netns.path());
        assert_ne!(pod, ours, "the test namespace is the test's own");
        assert_eq!(ns_of(&inside), pod);
        assert_eq!(ns_of(&outside), ours);
        inside.kill().await.unwrap();
        outside.kill().await.unwrap();
    }

    #[tokio::test]
    async fn a_netns_that_cannot_be_used_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-netns");
        let err = NetNs::open(&missing).unwrap_err();
        assert!(matches!(err, Error::Netns { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-netns"), "{err}");

        let plain = dir.path().join("plain-file");
        std::fs::write(&plain, "").unwrap();
        let err = NetNs::open(&plain).unwrap_err();
        assert!(err.to_string().contains("plain-file"), "{err}");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("not a network namespace"));

        // Another kind of namespace is refused too.
        let err = NetNs::open(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(matches!(err, Error::Netns { .. }), "{err:?}");
        assert!(NetNs::open(Path::new("/proc/self/ns/net")).is_ok());
    }
}
