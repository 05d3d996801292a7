//! Calls whose caller stops listening. The ttrpc server drops a handler's
//! future at the caller's deadline, but a container being built goes on
//! building (libcontainer runs on the blocking pool), and the shim has
//! already reported the call failed: nobody would ever remove what it
//! made. So CreateContainer and StartProcess run on tasks of their own,
//! and what they make for a caller that is gone is undone here: the
//! container removed, the exec killed.

use super::{lock, Containers, CtrError, Entry, Result};
use clh_agent_protocol::Stdio;
use nix::sys::signal::Signal;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::{debug, warn};

impl Containers {
    /// Sets up the container and its init process, not started; returns
    /// the init's pid. Refuses an id that exists or is being created.
    pub async fn create(&self, id: &str, spec_json: &[u8], stdio: &Stdio) -> Result<u32> {
        super::validate_id("container id", id)?;
        self.claim(id)?;
        let (this, id, spec_json) = (self.clone(), id.to_owned(), spec_json.to_vec());
        let stdio = stdio.clone();
        let (answer, heard) = oneshot::channel();
        tokio::spawn(async move {
            let built = this.build(&id, &spec_json, &stdio).await;
            crate::faults::before_create_answer().await;
            let Ok((pid, entry)) = built else {
                this.release(&id, None);
                let _ = answer.send(built.map(|(pid, _)| pid));
                return;
            };
            let cancelled = this.release(&id, Some(entry));
            if cancelled {
                warn!(
                    id,
                    "removed while being created: removing it now it is built"
                );
                let removed = format!("container {id:?} was removed while being created");
                let _ = answer.send(Err(CtrError::FailedPrecondition(removed)));
            } else if answer.send(Ok(pid)).is_err() {
                warn!(id, "CreateContainer's caller gave up before its answer (its deadline passed): removing the container");
            } else {
                return;
            }
            if let Err(e) = this.remove(&id).await {
                warn!(id, "removing a container nobody waits for: {e}");
            }
        });
        heard
            .await
            .unwrap_or_else(|_| Err(ended_unanswered("CreateContainer")))
    }

    /// Starts init (empty `exec_id`) or a registered exec; returns its pid.
    /// An exec whose caller gave up is killed: the shim reported it did not
    /// start. An init is left to the container's removal, which follows a
    /// failed start.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (this, id, exec_id) = (self.clone(), id.to_owned(), exec_id.to_owned());
        let (answer, heard) = oneshot::channel();
        tokio::spawn(async move {
            let started = this.start_now(&id, &exec_id).await;
            if let Err(Ok(pid)) = answer.send(started) {
                if !exec_id.is_empty() {
                    warn!(
                        id,
                        exec_id,
                        pid,
                        "StartProcess's caller gave up (its deadline passed): killing the exec"
                    );
                    // Through its record: never a pid that was reaped and
                    // reused meanwhile.
                    if let Err(e) = this.signal(&id, &exec_id, Signal::SIGKILL as u32, false) {
                        debug!(id, exec_id, pid, "the exec had already gone: {e}");
                    }
                }
            }
        });
        heard
            .await
            .unwrap_or_else(|_| Err(ended_unanswered("StartProcess")))
    }

    /// Marks `id` as being created.
    fn claim(&self, id: &str) -> Result<()> {
        let mut creating = lock(&self.creating);
        if creating.contains_key(id) || lock(&self.map).contains_key(id) {
            return Err(CtrError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        creating.insert(id.to_owned(), false);
        Ok(())
    }

    /// Ends `id`'s creation, registering `entry` if it was built; returns
    /// whether a removal came meanwhile. One critical section with the
    /// registration, so that a removal finds the container in one place
    /// or the other.
    fn release(&self, id: &str, entry: Option<Entry>) -> bool {
        let mut creating = lock(&self.creating);
        let cancelled = creating.remove(id).unwrap_or(false);
        if let Some(entry) = entry {
            lock(&self.map).insert(id.to_owned(), Arc::new(entry));
        }
        cancelled
    }

    /// If `id` is being created, has it removed once built and says so.
    pub(super) fn cancel_creation(&self, id: &str) -> bool {
        match lock(&self.creating).get_mut(id) {
            Some(cancelled) => {
                *cancelled = true;
                true
            }
            None => false,
        }
    }
}

fn ended_unanswered(call: &str) -> CtrError {
    CtrError::Internal {
        what: format!(
            "the agent's {call} task ended without an answer (see the guest console log)"
        ),
        source: None,
    }
}
