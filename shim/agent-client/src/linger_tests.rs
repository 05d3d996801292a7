//! A handshake given up before the peer answered keeps its connection open
//! until the answer comes: vhost-device-vsock panics (and stops serving the
//! VM's vsock for good) when it writes `OK <port>` to a socket the host side
//! has closed meanwhile. See the `hybrid_vsock` module documentation.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::hybrid_vsock::connect_lingering;
use crate::tests::read_connect_line;
use crate::{connect_hybrid_vsock, HandshakeError};

const PORT: u32 = 1024;
const SHORT: Duration = Duration::from_millis(300);
/// Bound on every wait for something that should happen at once.
const WAIT: Duration = Duration::from_secs(10);

/// What the peer saw: whether its late `OK` could be written, and whether
/// the client closed the connection afterwards (within [`WAIT`]).
struct Outcome {
    wrote: std::io::Result<()>,
    closed: bool,
}

/// A hybrid-vsock peer that reads one `CONNECT`, reports it, and answers
/// `OK` only when the test says so (or never, for `answer: None`).
struct LatePeer {
    path: PathBuf,
    requested: oneshot::Receiver<()>,
    answer: Option<oneshot::Sender<()>>,
    outcome: oneshot::Receiver<Outcome>,
}

fn late_peer(dir: &std::path::Path, answers: bool) -> LatePeer {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (requested_tx, requested) = oneshot::channel();
    let (answer_tx, answer_rx) = oneshot::channel::<()>();
    let (outcome_tx, outcome) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        assert_eq!(
            read_connect_line(&mut stream).await,
            format!("CONNECT {PORT}")
        );
        let _ = requested_tx.send(());
        let wrote = if answers {
            // The test drops the sender if it fails: answer then anyway.
            let _ = answer_rx.await;
            stream.write_all(format!("OK {PORT}\n").as_bytes()).await
        } else {
            Ok(())
        };
        let closed = wrote.is_ok() && closes_within(&mut stream, WAIT).await;
        let _ = outcome_tx.send(Outcome { wrote, closed });
    });
    LatePeer {
        path,
        requested,
        answer: answers.then_some(answer_tx),
        outcome,
    }
}

/// Whether the other side closes `stream` within `limit` (data is skipped).
async fn closes_within(stream: &mut UnixStream, limit: Duration) -> bool {
    let eof = async {
        let mut buf = [0u8; 64];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    timeout(limit, eof).await.is_ok()
}

/// Lets the peer answer now and checks that the answer reached an open
/// socket, which was closed after it.
async fn answer_and_check(peer: LatePeer) {
    let LatePeer {
        answer, outcome, ..
    } = peer;
    answer.unwrap().send(()).unwrap();
    let Outcome { wrote, closed } = timeout(WAIT, outcome).await.unwrap().unwrap();
    // The real device writes with `.unwrap()`: EPIPE here is its panic.
    if let Err(e) = wrote {
        panic!("the late OK met a closed socket: {e}");
    }
    assert!(
        closed,
        "the given-up connection was not closed after its answer"
    );
}

#[tokio::test]
async fn an_attempt_that_times_out_stays_open_until_its_late_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut peer = late_peer(dir.path(), true);
    let err = connect_hybrid_vsock(&peer.path, PORT, SHORT)
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { .. }), "{err:?}");
    timeout(WAIT, &mut peer.requested).await.unwrap().unwrap();
    answer_and_check(peer).await;
}

#[tokio::test]
async fn an_attempt_whose_future_is_dropped_stays_open_until_its_late_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut peer = late_peer(dir.path(), true);
    let attempt = connect_hybrid_vsock(&peer.path, PORT, WAIT);
    // Dropped once the peer holds the request, as a caller's select! or
    // outer timeout would.
    let raced = timeout(WAIT, async {
        tokio::select! {
            result = attempt => panic!("the silent peer answered: {result:?}"),
            got = &mut peer.requested => got.unwrap(),
        }
    })
    .await;
    raced.unwrap();
    answer_and_check(peer).await;
}

#[tokio::test]
async fn an_unanswered_connection_is_closed_at_the_linger_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let peer = late_peer(dir.path(), false);
    let err = connect_lingering(&peer.path, PORT, SHORT, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { .. }), "{err:?}");
    let Outcome { wrote, closed } = timeout(WAIT, peer.outcome).await.unwrap().unwrap();
    assert!(wrote.is_ok());
    assert!(closed, "the lingering connection outlived its deadline");
}

#[tokio::test]
async fn an_answered_handshake_does_not_linger() {
    // The peer answers at once: the caller's stream is the only one left,
    // so dropping it closes the connection.
    let dir = tempfile::tempdir().unwrap();
    let peer = late_peer(dir.path(), true);
    let LatePeer {
        path,
        answer,
        outcome,
        ..
    } = peer;
    answer.unwrap().send(()).unwrap();
    let stream = connect_hybrid_vsock(&path, PORT, WAIT).await.unwrap();
    drop(stream);
    let Outcome { wrote, closed } = timeout(WAIT, outcome).await.unwrap().unwrap();
    assert!(wrote.is_ok());
    assert!(
        closed,
        "an answered connection was kept open after its drop"
    );
}
