//! The pod sandbox's pause container. It runs nothing in the guest (the VM
//! itself holds the pod's namespaces), so its process is a stand-in: its pid
//! is the VMM's, it ends when containerd signals it (as the real pause would,
//! with 128 + the signal) or when the VM dies.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::container::{Container, Exit, Status, VM_DIED_STATUS};
use super::error::{Error, Result};
use super::events::EventSender;
use super::stdio::DrainBounds;
use super::{finish, Containers};

/// Signals whose default action leaves a process running.
const IGNORED_BY_DEFAULT: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGCONT,
    Signal::SIGURG,
    Signal::SIGWINCH,
];

/// How long the stand-in waits for the pod's containers to report their
/// exits: each drains what the shim still holds of its output, bounded by
/// [`DrainBounds::VM_GONE`].
const CONTAINERS_FIRST: Duration = DrainBounds::VM_GONE
    .longest()
    .saturating_add(Duration::from_secs(1));

/// Ends the stand-in process when the VM dies, after the pod's containers
/// have reported their exits (bounded by [`CONTAINERS_FIRST`]). Order
/// matters: on the sandbox's exit containerd's CRI tears the pod down and
/// shuts the shim, and a container exit it handles after that finds the
/// shim gone and is retried only 5 s later, leaving the container RUNNING
/// in CRI meanwhile.
pub(super) async fn watch_vm<E: EventSender>(
    c: Arc<Container>,
    events: Arc<E>,
    containers: Arc<Containers>,
) {
    if !c.vm.died().await {
        return;
    }
    tracing::warn!(pod = %c.id, "the pod's VM exited");
    let exits: Vec<_> = containers
        .lock()
        .await
        .values()
        .filter(|o| !o.is_pause() && Arc::ptr_eq(&o.vm, &c.vm))
        .filter_map(|o| o.with_proc("", |p| p.exit.subscribe()).ok())
        .collect();
    let reported = tokio::time::timeout(CONTAINERS_FIRST, async {
        for mut exit in exits {
            let _ = exit.wait_for(Option::is_some).await;
        }
    });
    if reported.await.is_err() {
        tracing::warn!(pod = %c.id, "the pod's containers did not report their exits in time");
    }
    finish(&c, "", Exit::now(VM_DIED_STATUS), &*events).await;
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
