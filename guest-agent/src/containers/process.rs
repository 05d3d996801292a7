//! One process of a container (its init or an exec): its pid, the host-side
//! ends of its stdio pipes until the stdio server takes them, and its exit
//! status, published once through a watch channel so any number of
//! WaitProcess calls can await it without holding a lock.

use nix::fcntl::OFlag;
use nix::sys::wait::WaitStatus;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};
use tokio::sync::{oneshot, watch, Notify};

/// How a process ended, as containerd wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal number.
    pub status: u32,
    /// Unix time of the exit, in nanoseconds.
    pub at_ns: i64,
}

impl Exit {
    pub fn from_wait_status(status: WaitStatus) -> Self {
        let code = match status {
            WaitStatus::Exited(_, code) => code as u32,
            WaitStatus::Signaled(_, sig, _) => 128 + sig as u32,
            // waitpid without WUNTRACED/WCONTINUED reports only the above.
            _ => 255,
        };
        Self {
            status: code,
            at_ns: now_ns(),
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Which end of which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stdin" => Some(Self::Stdin),
            "stdout" => Some(Self::Stdout),
            "stderr" => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// The three fds a process gets; each is a pipe end or /dev/null.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends of the pipes, each `None` once attached (or unwanted).
#[derive(Default)]
struct HostEnds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

pub struct Proc {
    pid: Mutex<Option<i32>>,
    ends: Mutex<HostEnds>,
    /// The pty master, with a terminal (for ResizeTty).
    tty: Mutex<Option<OwnedFd>>,
    /// Whether the shim asked for stdin (with a terminal: the master).
    wants_stdin: bool,
    /// Whether stdio is a terminal, whose master exists only once the
    /// process is built (at Start): attaching waits for it.
    terminal: bool,
    /// Wakes attachers waiting for the master (or for the exit).
    changed: Notify,
    exit_tx: watch::Sender<Option<Exit>>,
    /// Wakes the stdin copier when CloseStdin is called after attach.
    pub stdin_close: Notify,
}

impl Proc {
    /// Creates pipes for the wanted streams (/dev/null for the others, so a
    /// process never inherits the agent's console) and returns the child's
    /// ends for the builder.
    pub fn new(stdin: bool, stdout: bool, stderr: bool) -> std::io::Result<(Self, ChildStdio)> {
        let mut ends = HostEnds::default();
        let child_in = if stdin {
            let (r, w) = pipe()?;
            ends.stdin = Some(w);
            r
        } else {
            dev_null()?
        };
        let out = |wanted: bool, slot: &mut Option<OwnedFd>| -> std::io::Result<OwnedFd> {
            if wanted {
                let (r, w) = pipe()?;
                widen(&r);
                *slot = Some(r);
                Ok(w)
            } else {
                dev_null()
            }
        };
        let child_out = out(stdout, &mut ends.stdout)?;
        let child_err = out(stderr, &mut ends.stderr)?;
        let (exit_tx, _) = watch::channel(None);
        let proc = Self {
            pid: Mutex::new(None),
            ends: Mutex::new(ends),
            tty: Mutex::new(None),
            wants_stdin: stdin,
            terminal: false,
            changed: Notify::new(),
            exit_tx,
            stdin_close: Notify::new(),
        };
        let child = ChildStdio {
            stdin: child_in,
            stdout: child_out,
            stderr: child_err,
        };
        Ok((proc, child))
    }

    /// A process whose stdio is a terminal: no pipes (libcontainer puts
    /// the pty slave on 0-2) until [`Proc::set_terminal`] gives the master.
    pub fn new_terminal(stdin: bool) -> std::io::Result<(Self, ChildStdio)> {
        let (mut proc, child) = Self::new(false, false, false)?;
        proc.wants_stdin = stdin;
        proc.terminal = true;
        Ok((proc, child))
    }

    /// The pty master: stdout reads it, stdin (if wanted) writes it.
    pub fn set_terminal(&self, master: OwnedFd) -> std::io::Result<()> {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        ends.stdout = Some(master.try_clone()?);
        if self.wants_stdin {
            ends.stdin = Some(master.try_clone()?);
        }
        *self.tty.lock().unwrap_or_else(PoisonError::into_inner) = Some(master);
        drop(ends);
        self.changed.notify_waiters();
        Ok(())
    }

    fn has_tty(&self) -> bool {
        self.tty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether a stream can be attached: its end is here, or it is a
    /// terminal stream whose master comes at Start.
    pub fn attachable(&self, kind: StreamKind) -> bool {
        let ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        let here = match kind {
            StreamKind::Stdin => ends.stdin.is_some(),
            StreamKind::Stdout => ends.stdout.is_some(),
            StreamKind::Stderr => ends.stderr.is_some(),
        };
        let later = self.terminal
            && !self.has_tty()
            && match kind {
                StreamKind::Stdout => true,
                StreamKind::Stdin => self.wants_stdin,
                StreamKind::Stderr => false,
            };
        here || later
    }

    /// [`Proc::take_end`], waiting for a terminal's master if need be;
    /// `None` if the process exits first or another attach took the end.
    pub async fn take_end_when_ready(&self, kind: StreamKind) -> Option<OwnedFd> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the checks, so no wake-up is lost.
            notified.as_mut().enable();
            if let Some(fd) = self.take_end(kind) {
                return Some(fd);
            }
            if !self.terminal || self.has_tty() || self.exit().is_some() {
                return None;
            }
            notified.await;
        }
    }

    /// Sets the terminal size; `false` if the process has no terminal.
    pub fn resize(&self, width: u32, height: u32) -> std::io::Result<bool> {
        let tty = self.tty.lock().unwrap_or_else(PoisonError::into_inner);
        match tty.as_ref() {
            Some(master) => super::tty::resize(master, width, height).map(|()| true),
            None => Ok(false),
        }
    }

    pub fn pid(&self) -> Option<i32> {
        *self.pid.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the pid and publishes the exit status once the reaper
    /// delivers it.
    pub fn started(self: &std::sync::Arc<Self>, pid: i32, rx: oneshot::Receiver<WaitStatus>) {
        *self.pid.lock().unwrap_or_else(PoisonError::into_inner) = Some(pid);
        let this = self.clone();
        tokio::spawn(async move {
            // A dropped sender means the reaper is gone: report a kill.
            let exit = match rx.await {
                Ok(status) => Exit::from_wait_status(status),
                Err(_) => Exit {
                    status: 137,
                    at_ns: now_ns(),
                },
            };
            tracing::debug!(pid, status = exit.status, "process exited");
            this.exit_tx.send_replace(Some(exit));
            this.changed.notify_waiters();
        });
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Waits for the exit without holding any lock.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // Unreachable while self (the sender) lives.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Takes the agent's end of a stream for the stdio server; `None` if it
    /// was not requested or is already attached.
    pub fn take_end(&self, kind: StreamKind) -> Option<OwnedFd> {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        match kind {
            StreamKind::Stdin => ends.stdin.take(),
            StreamKind::Stdout => ends.stdout.take(),
            StreamKind::Stderr => ends.stderr.take(),
        }
    }

    /// Closes stdin: drops the pipe end if not attached yet, or tells the
    /// copier to stop.
    pub fn close_stdin(&self) {
        drop(self.take_end(StreamKind::Stdin));
        // notify_one keeps a permit, so a copier attaching later sees it.
        self.stdin_close.notify_one();
    }
}

/// A pipe whose ends are close-on-exec in the agent; the builder dup2()s
/// the child's end onto 0/1/2, which clears the flag there.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// The size of an output pipe: the stdio server then reads its output in
/// pieces of up to [`crate::stdio_server::CHUNK`], not the 64 KiB a
/// default pipe holds, and a process writing fast blocks less often.
const OUTPUT_PIPE_SIZE: nix::libc::c_int = 1024 * 1024;

/// Grows an output pipe to [`OUTPUT_PIPE_SIZE`]; a kernel that refuses
/// (a lower `fs.pipe-max-size`) leaves it as it is: slower, not wrong.
fn widen(pipe: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    if let Err(e) = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_SIZE)) {
        tracing::debug!("cannot grow an output pipe: {e}");
    }
}

fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exit_status_is_code_or_128_plus_signal() {
        let p = Pid::from_raw(5);
        assert_eq!(Exit::from_wait_status(WaitStatus::Exited(p, 7)).status, 7);
        let s = WaitStatus::Signaled(p, Signal::SIGTERM, false);
        assert_eq!(Exit::from_wait_status(s).status, 143);
    }

    #[tokio::test]
    async fn wait_returns_the_delivered_status() {
        let (proc, _child) = Proc::new(true, true, false).unwrap();
        let proc = std::sync::Arc::new(proc);
        let (tx, rx) = oneshot::channel();
        proc.started(42, rx);
        assert_eq!(proc.pid(), Some(42));
        tx.send(WaitStatus::Exited(Pid::from_raw(42), 3)).unwrap();
        assert_eq!(proc.wait().await.status, 3);
        assert!(proc.take_end(StreamKind::Stdout).is_some());
        assert!(proc.take_end(StreamKind::Stdout).is_none());
        assert!(proc.take_end(StreamKind::Stderr).is_none());
    }
}
