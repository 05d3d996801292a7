//! TaskOOM events.
//!
//! The agent reports OOM kills two ways: the GetOomEvent long poll (one per
//! VM, [`watch`]), fed by a 500 ms poll of `memory.events` in the
//! guest, and the container's `oom_kill` counter in ContainerStats. A hog that is killed exits at once,
//! and with `ctr run --rm` its VM is gone before the guest's next poll, so
//! the exit path reads the counter too and publishes TaskOOM before TaskExit
//! (the order containerd expects). `Container::oom_published` keeps the two
//! paths from reporting one kill twice.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::topics;

use super::container::Container;
use super::events::EventSender;
use super::{publish, Containers};
use crate::vm::PodVm;

/// Long-polls the VM's agent for OOM kills and publishes each new one for
/// the container it names, until the VM stops (it owns this task) or its
/// agent connection ends.
pub(super) async fn watch<E: EventSender>(
    vm: Weak<PodVm>,
    containers: Arc<Containers>,
    events: Arc<E>,
) {
    loop {
        let Some(agent) = vm.upgrade().map(|vm| vm.agent().clone()) else {
            return;
        };
        let id = match agent.get_oom_event().await {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(error = %e, "OOM event loop ends");
                return;
            }
        };
        let member = containers.lock().await.get(&id).cloned();
        let ours = |c: &Arc<Container>| vm.upgrade().is_some_and(|vm| c.vm.id() == vm.id());
        if let Some(c) = member.filter(ours) {
            publish_new_kills(&c, &*events).await;
        }
    }
}

/// Publishes TaskOOM if the container's guest cgroup counts an OOM kill not
/// yet reported. Best effort: a container whose VM is gone has no counter.
pub(super) async fn publish_new_kills<E: EventSender>(c: &Container, events: &E) {
    let Ok(stats) = c.vm.agent().container_stats(&c.id).await else {
        return;
    };
    let kills = stats.memory_oom_kills;
    // fetch_max: of two concurrent callers seeing the same new count, only
    // the one that raised it publishes.
    if c.oom_published.fetch_max(kills, Ordering::SeqCst) < kills {
        let ev = TaskOOM {
            container_id: c.id.clone(),
            ..Default::default()
        };
        publish(events, topics::TASK_OOM_EVENT_TOPIC, ev).await;
    }
}
