//! Where the Task service's events go: containerd in production, a channel
//! in tests.

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::MessageDyn;

/// One event, with its topic (`/tasks/create`, ...).
pub struct Event {
    pub topic: &'static str,
    pub message: Box<dyn MessageDyn>,
}

#[async_trait::async_trait]
pub trait EventSender: Send + Sync + 'static {
    async fn send(&self, event: Event);
}

/// Publishes to containerd through its event service.
pub struct RemoteEventSender {
    publisher: RemotePublisher,
    namespace: String,
}

impl RemoteEventSender {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl EventSender for RemoteEventSender {
    async fn send(&self, event: Event) {
        let ctx = containerd_shim_protos::ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, event.topic, &self.namespace, event.message)
            .await
        {
            tracing::warn!(topic = event.topic, error = %e, "cannot publish an event");
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
