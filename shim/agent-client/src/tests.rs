//! Fake hybrid-vsock peers on Unix sockets: every failure mode of the
//! handshake ends with the right error within a bounded time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clh_agent_protocol::{CheckResponse, VersionRequest, VersionResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

const PORT: u32 = 1024;
const SHORT: Duration = Duration::from_millis(300);

/// What a fake peer does after reading `CONNECT <port>\n`.
#[derive(Clone, Copy)]
enum Peer {
    Good,
    Silent,
    AnswersAfter(Duration),
    Garbage,
    ClosesAtOnce,
    EndlessLine,
}

pub(super) async fn read_connect_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Binds a fake hybrid-vsock socket in `dir` that serves `peer` forever.
fn fake_peer(dir: &Path, peer: Peer) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Peer::ClosesAtOnce = peer {
                    return;
                }
                assert_eq!(
                    read_connect_line(&mut stream).await,
                    format!("CONNECT {PORT}")
                );
                match peer {
                    Peer::Good => {
                        // The bytes after the OK line belong to the next
                        // protocol and must not be consumed by the handshake.
                        stream.write_all(b"OK 1024\nTTRPC").await.unwrap();
                    }
                    Peer::AnswersAfter(delay) => {
                        tokio::time::sleep(delay).await;
                        let _ = stream.write_all(b"OK 1024\n").await;
                    }
                    Peer::Garbage => stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\n")
                        .await
                        .unwrap(),
                    Peer::EndlessLine => {
                        let _ = stream.write_all(&[b'A'; 4096]).await;
                    }
                    Peer::Silent | Peer::ClosesAtOnce => {}
                }
                // Keep the connection open (silent peers stay silent).
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    path
}

async fn handshake(peer: Peer) -> (Result<UnixStream, HandshakeError>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_peer(dir.path(), peer);
    let started = Instant::now();
    let result = connect_hybrid_vsock(&path, PORT, SHORT).await;
    (result, started.elapsed())
}

#[tokio::test]
async fn a_good_peer_leaves_the_stream_right_after_the_ok_line() {
    let (result, elapsed) = handshake(Peer::Good).await;
    let mut stream = result.unwrap();
    let mut rest = [0u8; 5];
    stream.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"TTRPC");
    assert!(elapsed < SHORT);
}

#[tokio::test]
async fn a_silent_peer_times_out_at_the_deadline() {
    let (result, elapsed) = handshake(Peer::Silent).await;
    assert!(
        matches!(result, Err(HandshakeError::Timeout { .. })),
        "{result:?}"
    );
    assert!(elapsed >= SHORT && elapsed < SHORT * 3, "{elapsed:?}");
}

#[tokio::test]
async fn a_peer_answering_after_the_deadline_times_out() {
    let (result, elapsed) = handshake(Peer::AnswersAfter(SHORT * 3)).await;
    assert!(
        matches!(result, Err(HandshakeError::Timeout { .. })),
        "{result:?}"
    );
    assert!(elapsed < SHORT * 3, "{elapsed:?}");
}

#[tokio::test]
async fn a_garbage_reply_is_quoted_truncated() {
    let (result, elapsed) = handshake(Peer::Garbage).await;
    let err = result.unwrap_err();
    assert!(matches!(err, HandshakeError::Garbage { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP/1.1 400"), "{err}");
    assert!(elapsed < SHORT);
}

#[tokio::test]
async fn a_peer_that_closes_at_once_is_retryable() {
    let (result, elapsed) = handshake(Peer::ClosesAtOnce).await;
    let err = result.unwrap_err();
    // Closing before we wrote can also surface as a reset or broken pipe.
    assert!(err.is_retryable(), "{err:?}");
    assert!(elapsed < SHORT);
}

#[tokio::test]
async fn an_overlong_line_is_refused_without_reading_it_all() {
    let (result, elapsed) = handshake(Peer::EndlessLine).await;
    let err = result.unwrap_err();
    assert!(matches!(err, HandshakeError::LineTooLong { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(elapsed < SHORT);
}

#[tokio::test]
async fn a_missing_socket_is_a_retryable_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = connect_hybrid_vsock(&dir.path().join("none.sock"), PORT, SHORT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandshakeError::Connect { .. }) && err.is_retryable(),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_gives_up_at_its_deadline_while_the_peer_keeps_closing() {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_peer(dir.path(), Peer::ClosesAtOnce);
    let started = Instant::now();
    let err = AgentClient::connect(&path, Duration::from_millis(500))
        .await
        .err()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, Error::Unreachable { attempts, .. } if attempts > 1),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// A fake agent behind a fake hybrid-vsock socket: answers the handshake,
/// then serves ttrpc with the given protocol version.
struct FakeAgent {
    protocol_version: u32,
}

#[async_trait]
impl clh_agent_protocol::Agent for FakeAgent {
    async fn version(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            protocol_version: self.protocol_version,
            agent_version: "fake".into(),
            ..Default::default()
        })
    }
    async fn check(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: clh_agent_protocol::CheckRequest,
    ) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            boot_id: "b00t".into(),
            ..Default::default()
        })
    }
    async fn start_process(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: clh_agent_protocol::ProcessRequest,
    ) -> ttrpc::Result<clh_agent_protocol::StartProcessResponse> {
        if req.container_id == "slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if req.container_id != "c1" {
            let msg = format!("container {:?} not found", req.container_id);
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                msg,
            )));
        }
        Ok(clh_agent_protocol::StartProcessResponse {
            pid: 42,
            ..Default::default()
        })
    }
    async fn wait_process(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: clh_agent_protocol::ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        // Longer than the client's call timeout: the long poll has none.
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok(WaitProcessResponse {
            exit_status: 7,
            ..Default::default()
        })
    }
}

async fn fake_agent(dir: &Path, protocol_version: u32) -> (PathBuf, ttrpc::r#async::Server) {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let accepted = async_stream_of(listener);
    let service = clh_agent_protocol::create_agent(Arc::new(FakeAgent { protocol_version }));
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::new(accepted))
        .register_service(service);
    server.start().await.unwrap();
    (path, server)
}

/// Accepted connections after their `CONNECT` line has been answered.
fn async_stream_of(
    listener: UnixListener,
) -> impl futures::Stream<Item = std::io::Result<UnixStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = async {
            let (mut stream, _) = listener.accept().await?;
            read_connect_line(&mut stream).await;
            stream.write_all(b"OK 1024\n").await?;
            Ok(stream)
        }
        .await;
        Some((accepted, listener))
    })
}

#[tokio::test]
async fn connect_checks_the_version_and_calls_work() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = fake_agent(dir.path(), clh_agent_protocol::PROTOCOL_VERSION).await;
    let client = AgentClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(client.agent_version(), "fake");
    assert_eq!(client.check().await.unwrap().boot_id, "b00t");
}

#[tokio::test]
async fn a_protocol_mismatch_is_final_and_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = fake_agent(dir.path(), 999).await;
    let started = Instant::now();
    let err = AgentClient::connect(&path, Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::ProtocolMismatch { agent: 999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("999"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn typed_calls_map_replies_and_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _server) = fake_agent(dir.path(), clh_agent_protocol::PROTOCOL_VERSION).await;
    let client = AgentClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap()
        .with_call_timeout(Duration::from_millis(200));
    assert_eq!(client.start_process("c1", "").await.unwrap(), 42);
    let err = client.start_process("nope", "").await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(ttrpc::Code::NOT_FOUND), "{err:?}");
    // The long poll outlives the 200 ms call timeout.
    assert_eq!(client.wait_process("c1", "").await.unwrap().exit_status, 7);
    // An RPC the fake does not implement: answered, with a code.
    let err = client.list_pids("c1").await.unwrap_err();
    assert!(err.rpc_code().is_some(), "{err:?}");
    // A call past its deadline names the call and the deadline.
    let err = client.start_process("slow", "").await.unwrap_err();
    assert!(
        matches!(err, Error::Deadline { method: "StartProcess", timeout, .. } if timeout == Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(err.is_timeout());
    assert!(
        err.to_string().contains("StartProcess within 200ms"),
        "{err}"
    );
}

#[test]
fn attempts_that_time_out_get_longer_up_to_a_cap() {
    let timed_out = HandshakeError::Timeout {
        port: PORT,
        timeout: ATTEMPT_TIMEOUT,
        received: String::new(),
    };
    let closed = HandshakeError::PeerClosed { port: PORT };
    let mut t = ATTEMPT_TIMEOUT;
    let mut seen = vec![t];
    for _ in 0..5 {
        t = next_attempt_timeout(t, &timed_out);
        seen.push(t);
    }
    let secs: Vec<u64> = seen.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [2, 4, 8, 16, 16, 16]);
    assert_eq!(
        next_attempt_timeout(ATTEMPT_TIMEOUT, &closed),
        ATTEMPT_TIMEOUT
    );
}
