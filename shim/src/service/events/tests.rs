//! The event queue against a fake containerd (down, up, refusing, hung)
//! and against a real ttrpc Events server that is restarted, as
//! containerd is (REL-CTRD-01).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::event::Envelope;

use super::*;

/// What the fake containerd does with the next call.
#[derive(Default)]
struct Fake {
    up: bool,
    /// Container ids it refuses with a status.
    refuse: Vec<String>,
    /// Never answer (a hung containerd) while set.
    hang: bool,
    connects: u32,
    /// The container ids it took, in order.
    taken: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeTransport(Arc<Mutex<Fake>>);

impl FakeTransport {
    fn set(&self, f: impl FnOnce(&mut Fake)) {
        f(&mut self.0.lock().unwrap());
    }
    fn taken(&self) -> Vec<String> {
        self.0.lock().unwrap().taken.clone()
    }
    fn connects(&self) -> u32 {
        self.0.lock().unwrap().connects
    }
}

fn container_id(envelope: &Envelope) -> String {
    TaskExit::parse_from_bytes(&envelope.event().value)
        .map(|e| e.container_id)
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Transport for FakeTransport {
    async fn connect(&mut self) -> Result<(), String> {
        let mut f = self.0.lock().unwrap();
        f.connects += 1;
        if f.up {
            Ok(())
        } else {
            Err("connection refused".into())
        }
    }

    async fn forward(&mut self, envelope: &Envelope) -> Result<(), ForwardError> {
        let hang = self.0.lock().unwrap().hang;
        if hang {
            std::future::pending::<()>().await;
        }
        let mut f = self.0.lock().unwrap();
        let id = container_id(envelope);
        if !f.up {
            return Err(ForwardError::Transport("channel closed".into()));
        }
        if f.refuse.contains(&id) {
            return Err(ForwardError::Rejected("invalid".into()));
        }
        f.taken.push(id);
        Ok(())
    }
}

fn exit(id: &str) -> Event {
    Event {
        topic: "/tasks/exit",
        message: Box::new(TaskExit {
            container_id: id.to_string(),
            ..Default::default()
        }),
    }
}

fn ids(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("c{i}")).collect()
}

/// Long enough for any backoff: the clock is paused, so waiting costs
/// nothing unless something is wrong.
const LONG: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn events_sent_while_containerd_is_down_arrive_in_order_once_it_is_back() {
    let fake = FakeTransport::default();
    fake.set(|f| f.up = true);
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 16);
    sender.send(exit("c0")).await;
    sender.flush(LONG).await;
    assert_eq!(fake.taken(), ids(0..1));

    // containerd goes away: sending returns at once, the events wait.
    fake.set(|f| f.up = false);
    let start = tokio::time::Instant::now();
    for id in ids(1..6) {
        sender.send(exit(&id)).await;
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "send waited for containerd"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(sender.queued(), 5);

    fake.set(|f| f.up = true);
    sender.flush(LONG).await;
    assert_eq!(fake.taken(), ids(0..6));
    assert_eq!(sender.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn retries_are_spaced_by_a_bounded_backoff() {
    let fake = FakeTransport::default();
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 16);
    sender.send(exit("c0")).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    // 50 ms doubling to 2 s: about 35 attempts in a minute; never fewer
    // than one per MAX_BACKOFF, never a busy loop.
    let n = fake.connects();
    assert!((30..=60).contains(&n), "{n} connection attempts in 60 s");
    fake.set(|f| f.up = true);
    let back = tokio::time::Instant::now();
    sender.flush(LONG).await;
    assert!(back.elapsed() <= MAX_BACKOFF, "{:?}", back.elapsed());
    assert_eq!(fake.taken(), ids(0..1));
}

#[tokio::test(start_paused = true)]
async fn a_refused_event_is_dropped_and_the_next_ones_follow() {
    let fake = FakeTransport::default();
    fake.set(|f| {
        f.up = true;
        f.refuse = vec!["c1".into()];
    });
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 16);
    for id in ids(0..3) {
        sender.send(exit(&id)).await;
    }
    sender.flush(LONG).await;
    assert_eq!(fake.taken(), vec!["c0".to_string(), "c2".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded_and_keeps_the_oldest_events() {
    let fake = FakeTransport::default();
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 3);
    for id in ids(0..5) {
        sender.send(exit(&id)).await;
    }
    assert_eq!(sender.queued(), 3);
    fake.set(|f| f.up = true);
    sender.flush(LONG).await;
    assert_eq!(fake.taken(), ids(0..3));
}

#[tokio::test(start_paused = true)]
async fn a_hung_containerd_times_out_and_the_event_goes_over_a_new_connection() {
    let fake = FakeTransport::default();
    fake.set(|f| {
        f.up = true;
        f.hang = true;
    });
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 16);
    sender.send(exit("c0")).await;
    tokio::time::sleep(FORWARD_TIMEOUT * 3).await;
    assert!(fake.connects() >= 2, "never reconnected");
    fake.set(|f| f.hang = false);
    sender.flush(LONG).await;
    assert_eq!(fake.taken(), ids(0..1));
}

#[tokio::test(start_paused = true)]
async fn flush_gives_up_at_its_deadline() {
    let fake = FakeTransport::default();
    let sender = RemoteEventSender::with_transport(fake.clone(), "k8s.io", 16);
    sender.send(exit("c0")).await;
    let start = tokio::time::Instant::now();
    sender.flush(Duration::from_secs(1)).await;
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(sender.queued(), 1);
}

/// A ttrpc Events server, as containerd's, that reports each container id
/// it is given.
mod real {
    use std::sync::Arc;

    use containerd_shim_protos::api::Empty;
    use containerd_shim_protos::shim::events::ForwardRequest;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use containerd_shim_protos::ttrpc;
    use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
    use tokio::sync::mpsc;

    struct Sink(mpsc::UnboundedSender<String>);

    #[async_trait::async_trait]
    impl Events for Sink {
        async fn forward(&self, _: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            let _ = self.0.send(super::container_id(req.envelope()));
            Ok(Empty::default())
        }
    }

    pub(super) fn serve(path: &std::path::Path, tx: mpsc::UnboundedSender<String>) -> Server {
        let _ = std::fs::remove_file(path);
        Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_events(Arc::new(Sink(tx))))
    }
}

async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no event within 10 s")
}

/// The regression: containerd restarts (its server goes, a new one binds
/// the same socket) and the next events still reach it, in order.
#[tokio::test]
async fn events_reach_a_restarted_ttrpc_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("containerd.sock.ttrpc");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut server = real::serve(&path, tx.clone());
    server.start().await.unwrap();
    let sender = RemoteEventSender::new(path.to_str().unwrap(), "k8s.io");
    sender.send(exit("before")).await;
    assert_eq!(recv(&mut rx).await.as_deref(), Some("before"));

    server.shutdown().await.unwrap();
    drop(server);
    for id in ["during-1", "during-2"] {
        sender.send(exit(id)).await;
    }
    let mut server = real::serve(&path, tx);
    server.start().await.unwrap();
    sender.send(exit("after")).await;
    for want in ["during-1", "during-2", "after"] {
        assert_eq!(recv(&mut rx).await.as_deref(), Some(want));
    }
    server.shutdown().await.unwrap();
}
