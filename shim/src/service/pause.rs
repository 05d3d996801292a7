//! The pod sandbox's pause container. It runs nothing in the guest (the VM
//! itself holds the pod's namespaces), so its process is a stand-in: its pid
//! is the VMM's, it ends when containerd signals it (as the real pause would,
//! with 128 + the signal) or when the VM dies.

use std::sync::Arc;

use nix::sys::signal::Signal;

use super::container::{Container, Exit, Status, VM_DIED_STATUS};
use super::error::{Error, Result};
use super::events::EventSender;
use super::finish;

/// Signals whose default action leaves a process running.
const IGNORED_BY_DEFAULT: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGCONT,
    Signal::SIGURG,
    Signal::SIGWINCH,
];

/// Ends the stand-in process when the VM dies.
pub(super) async fn watch_vm<E: EventSender>(c: Arc<Container>, events: Arc<E>) {
    if c.vm.died().await {
        tracing::warn!(pod = %c.id, "the pod's VM exited");
        finish(&c, "", Exit::now(VM_DIED_STATUS), &*events).await;
    }
}

/// Kill of the pause container: any signal that would end the real pause
/// ends the stand-in.
pub(super) async fn kill<E: EventSender>(c: &Container, signal: u32, events: &E) -> Result<()> {
    let status = c.with_proc("", |p| p.status)?;
    if status == Status::Stopped {
        return Err(Error::NotFound(format!(
            "the pause process of pod {} has already exited",
            c.id
        )));
    }
    if signal == 0 || IGNORED_BY_DEFAULT.iter().any(|s| *s as u32 == signal) {
        return Ok(());
    }
    finish(c, "", Exit::now(128 + signal), events).await;
    Ok(())
}
