//! TaskOOM events.
//!
//! The agent reports OOM kills two ways: the GetOomEvent long poll (one per
//! VM, in sandbox.rs), fed by a 500 ms poll of `memory.events` in the
//! guest, and the container's `oom_kill` counter in ContainerStats. A hog that is killed exits at once,
//! and with `ctr run --rm` its VM is gone before the guest's next poll, so
//! the exit path reads the counter too and publishes TaskOOM before TaskExit
//! (the order containerd expects). `Container::oom_published` keeps the two
//! paths from reporting one kill twice.

use std::sync::atomic::Ordering;

use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::topics;

use super::container::{ctx, Container, CALL_TIMEOUT};
use super::events::EventSender;
use super::publish;

/// Publishes TaskOOM if the container's guest cgroup counts an OOM kill not
/// yet reported. Best effort: a container whose VM is gone has no counter.
pub(super) async fn publish_new_kills<E: EventSender>(c: &Container, events: &E) {
    let req = clh_agent_protocol::ContainerRequest {
        container_id: c.id.clone(),
        ..Default::default()
    };
    let Ok(stats) = c
        .sandbox
        .agent
        .container_stats(ctx(CALL_TIMEOUT), &req)
        .await
    else {
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
