//! Where the Task service's events go: containerd in production, a channel
//! in tests.
//!
//! containerd learns of a process's exit, an OOM kill or a new exec only
//! through these events (CRI reads the OOMKilled reason from TaskOOM
//! alone), and it restarts while pods run (REL-CTRD-01): its event socket
//! goes away and comes back. So [`RemoteEventSender`] queues every event
//! and one worker task forwards them in order, reconnecting with a bounded
//! backoff until containerd answers again:
//!
//! - `send` never waits on containerd: it only appends to the queue, so a
//!   restart never blocks a Task call or an exit waiter;
//! - the queue holds at most [`QUEUE_CAPACITY`] events; past that, new
//!   events are dropped with an error in the log (memory stays bounded if
//!   containerd never returns);
//! - an event leaves the queue only once containerd took it, or refused it
//!   with a status (which retrying would not change), so none is lost to a
//!   restart and none overtakes another;
//! - each attempt has a deadline ([`FORWARD_TIMEOUT`]), so a hung
//!   containerd is treated like a gone one.

mod ttrpc;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim::event::Envelope;
use tokio::sync::watch;

/// One event, with its topic (`/tasks/create`, ...).
pub struct Event {
    pub topic: &'static str,
    pub message: Box<dyn MessageDyn>,
}

#[async_trait::async_trait]
pub trait EventSender: Send + Sync + 'static {
    /// Queues `event` for containerd; never waits for it to be delivered.
    async fn send(&self, event: Event);

    /// Waits, at most `within`, until every queued event was delivered
    /// (before the shim exits).
    async fn flush(&self, _within: Duration) {}
}

/// How many events may wait for containerd: a pod's lifetime of exits and
/// execs while containerd is down, with room to spare.
pub const QUEUE_CAPACITY: usize = 1024;

/// Deadline of one Forward call.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The first wait after a failed attempt; doubled after each failure up to
/// [`MAX_BACKOFF`]. Short: containerd restarts in about a second, and the
/// exits it missed should reach it soon after.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why one forward failed.
#[derive(Debug)]
pub(crate) enum ForwardError {
    /// The connection is gone or did not answer in time: reconnect and
    /// send the same event again.
    Transport(String),
    /// containerd answered with an error: retrying would get the same one.
    Rejected(String),
}

/// What carries envelopes to containerd: its ttrpc Events service in
/// production ([`ttrpc::TtrpcEvents`]), a fake in the unit tests.
#[async_trait::async_trait]
pub(crate) trait Transport: Send + 'static {
    /// Opens a new connection in place of the current one.
    async fn connect(&mut self) -> Result<(), String>;
    /// Forwards one envelope over the current connection.
    async fn forward(&mut self, envelope: &Envelope) -> Result<(), ForwardError>;
}

/// Publishes to containerd through its event service, in order, across
/// containerd restarts (see the module doc).
pub struct RemoteEventSender {
    namespace: String,
    /// At most this many events wait (tests use fewer than [`QUEUE_CAPACITY`]).
    capacity: usize,
    queue: watch::Sender<VecDeque<Envelope>>,
    worker: tokio::task::JoinHandle<()>,
}

impl RemoteEventSender {
    /// Publishes to containerd's ttrpc address (`TTRPC_ADDRESS`) for
    /// `namespace`. Connects lazily, from the worker it spawns.
    pub fn new(address: &str, namespace: &str) -> Self {
        Self::with_transport(ttrpc::TtrpcEvents::new(address), namespace, QUEUE_CAPACITY)
    }

    pub(crate) fn with_transport(
        transport: impl Transport,
        namespace: &str,
        capacity: usize,
    ) -> Self {
        let (queue, pending) = watch::channel(VecDeque::new());
        let worker = tokio::spawn(forward_all(transport, queue.clone(), pending));
        Self {
            namespace: namespace.to_string(),
            capacity,
            queue,
            worker,
        }
    }

    /// How many events wait for containerd.
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    fn envelope(&self, event: Event) -> Result<Envelope, String> {
        let mut envelope = Envelope::new();
        envelope.set_topic(event.topic.to_string());
        envelope.set_namespace(self.namespace.clone());
        // The time it happened, not the time containerd came back.
        envelope.set_timestamp(containerd_shim::util::timestamp().map_err(|e| e.to_string())?);
        let any =
            containerd_shim::util::convert_to_any(event.message).map_err(|e| e.to_string())?;
        envelope.set_event(any);
        Ok(envelope)
    }
}

impl Drop for RemoteEventSender {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

#[async_trait::async_trait]
impl EventSender for RemoteEventSender {
    async fn send(&self, event: Event) {
        let topic = event.topic;
        let envelope = match self.envelope(event) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(topic, error = %e, "cannot encode an event; it is dropped");
                return;
            }
        };
        let queued = self.queue.send_if_modified(|q| {
            let room = q.len() < self.capacity;
            if room {
                q.push_back(envelope);
            }
            room
        });
        if !queued {
            tracing::error!(
                topic,
                capacity = self.capacity,
                "containerd has not taken events for a long time and the queue is full: this event is dropped"
            );
        }
    }

    async fn flush(&self, within: Duration) {
        let mut pending = self.queue.subscribe();
        let drained = pending.wait_for(VecDeque::is_empty);
        if tokio::time::timeout(within, drained).await.is_err() {
            tracing::warn!(
                queued = self.queued(),
                "containerd did not take every event before the shim exits"
            );
        }
    }
}

/// The worker: forwards the queue's head until containerd takes it, then
/// the next; reconnects after a transport failure, waiting longer after
/// each one in a row.
async fn forward_all(
    mut transport: impl Transport,
    queue: watch::Sender<VecDeque<Envelope>>,
    mut pending: watch::Receiver<VecDeque<Envelope>>,
) {
    let mut connected = false;
    let mut backoff = FIRST_BACKOFF;
    let mut failures: u32 = 0;
    loop {
        let head = match pending.wait_for(|q| !q.is_empty()).await {
            Ok(q) => q.front().cloned(),
            // The sender is gone: nothing more will come.
            Err(_) => return,
        };
        let Some(envelope) = head else { continue };
        let attempt = async {
            if !connected {
                transport.connect().await.map_err(ForwardError::Transport)?;
                connected = true;
            }
            match tokio::time::timeout(FORWARD_TIMEOUT, transport.forward(&envelope)).await {
                Ok(r) => r,
                Err(_) => Err(ForwardError::Transport(format!(
                    "no answer within {FORWARD_TIMEOUT:?}"
                ))),
            }
        };
        match attempt.await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        failures,
                        queued = queue.borrow().len(),
                        "containerd takes events again"
                    );
                }
                failures = 0;
                backoff = FIRST_BACKOFF;
                queue.send_modify(|q| {
                    q.pop_front();
                });
            }
            Err(ForwardError::Rejected(e)) => {
                tracing::error!(topic = envelope.topic(), error = %e, "containerd refused an event; it is dropped");
                queue.send_modify(|q| {
                    q.pop_front();
                });
            }
            Err(ForwardError::Transport(e)) => {
                connected = false;
                failures += 1;
                // The first failure, then one line a minute or so: a
                // containerd that is down for long must not flood the log.
                if failures == 1 || failures % 30 == 0 {
                    tracing::warn!(
                        error = %e,
                        failures,
                        queued = queue.borrow().len(),
                        "cannot reach containerd's event service; retrying"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Test sink: every event goes to the channel.
#[async_trait::async_trait]
impl EventSender for tokio::sync::mpsc::UnboundedSender<Event> {
    async fn send(&self, event: Event) {
        let _ = tokio::sync::mpsc::UnboundedSender::send(self, event);
    }
}
