//! Reaping: as PID 1 we inherit every orphan and must wait for it, or the
//! process table fills with zombies.
//!
//! The trap is that `waitpid(-1)` also collects children we spawned on
//! purpose, stealing the exit status that code is waiting for. So the
//! reaper owns a registry: code that spawns a child registers its pid with
//! [`Reaper::spawn_registered`], and the reaper delivers that child's status
//! through a oneshot channel instead of discarding it. Registration happens
//! with the registry locked, and the reaper takes the same lock before it
//! waits, so a child that exits at once can never be reaped unregistered.
//!
//! Children must therefore never be waited for any other way (in particular
//! not with `tokio::process::Child::wait`, whose own SIGCHLD handling would
//! race with this loop).

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

type Registry = HashMap<Pid, oneshot::Sender<WaitStatus>>;

/// Shared handle to the pid registry; clone it into whatever spawns.
#[derive(Clone, Default)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

impl Reaper {
    /// Runs `spawn` (which must return the new child's pid) with the
    /// registry locked, and registers the pid. The receiver yields the
    /// child's exit status once it has been reaped.
    pub fn spawn_registered<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(Pid, T), E>,
    ) -> Result<(T, oneshot::Receiver<WaitStatus>), E> {
        let mut registry = self.lock();
        let (pid, value) = spawn()?;
        let (tx, rx) = oneshot::channel();
        registry.insert(pid, tx);
        Ok((value, rx))
    }

    /// Installs the SIGCHLD handler and reaps until the runtime ends.
    /// Installing happens before returning, so no SIGCHLD is lost after it.
    pub fn start(self) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        tokio::spawn(async move {
            // Children may have exited before the handler existed.
            self.reap_all();
            while sigchld.recv().await.is_some() {
                // Signals coalesce: one SIGCHLD may stand for many exits.
                self.reap_all();
            }
        });
        Ok(())
    }

    fn reap_all(&self) {
        let mut registry = self.lock();
        loop {
            // __WALL: libcontainer clones container processes with
            // CLONE_PARENT and no exit signal; until they exec, they are
            // "clone" children that plain waitpid(-1) does not see.
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match registry.remove(&pid) {
                        // A dropped receiver means nobody cares any more.
                        Some(tx) => drop(tx.send(status)),
                        None => debug!(?status, "reaped orphan"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry stays consistent even if a holder panicked.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // waitpid(-1) in a test binary would steal other tests' children, so
    // only the registry logic is tested here; reaping is exercised in the VM.
    #[test]
    fn registration_returns_value_and_receiver() {
        let reaper = Reaper::default();
        let (v, _rx) = reaper
            .spawn_registered(|| Ok::<_, ()>((Pid::from_raw(4242), "child")))
            .unwrap();
        assert_eq!(v, "child");
        assert!(reaper.lock().contains_key(&Pid::from_raw(4242)));
    }

    #[test]
    fn spawn_failure_registers_nothing() {
        let reaper = Reaper::default();
        let r = reaper.spawn_registered(|| Err::<(Pid, ()), _>("no"));
        assert!(r.is_err());
        assert!(reaper.lock().is_empty());
    }
}
