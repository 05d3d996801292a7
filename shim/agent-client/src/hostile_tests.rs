//! SEC-SOCK-05: a hostile agent. A guest is untrusted once a container
//! runs in it; if it takes over the agent's port it speaks raw ttrpc
//! frames to the shim. Each misbehaviour below must end the call with an
//! error that says what happened, within the call's deadline, without the
//! shim allocating what the peer announces (ttrpc refuses frames over
//! `MESSAGE_LENGTH_MAX`, 4 MiB, and discards their bodies 4 KiB at a time).
//!
//! The fake answers the hybrid-vsock handshake and the connect-time
//! Version call correctly, then misbehaves on the next call (Check).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clh_agent_protocol::{VersionResponse, PROTOCOL_VERSION};
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use ttrpc::proto::{Request, Response};

use super::tests::read_connect_line;
use super::*;

/// The call deadline the tests give the client.
const CALL: Duration = Duration::from_millis(300);
/// Time a misbehaving peer keeps its connection open and silent.
const STALL: Duration = Duration::from_secs(30);
/// ttrpc's frame header: length, stream id, type, flags.
const HEADER_LEN: usize = 10;
const MESSAGE_TYPE_RESPONSE: u8 = 2;

/// The system allocator, recording the largest single allocation this
/// test binary makes: a client that trusted a frame's announced length
/// would ask for it in one piece.
struct RecordsLargest;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// only addition is an atomic store.
unsafe impl GlobalAlloc for RecordsLargest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is the system's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed` is the system's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, which is the system's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which is the system's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: RecordsLargest = RecordsLargest;

/// No single allocation in these tests comes near this; the hostile
/// frames announce 5 MiB and 4 GiB.
const ALLOCATION_BOUND: usize = 64 << 20;

/// What the fake agent does with the call after Version.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Sends half a frame header, then nothing.
    StallsMidFrame,
    /// Announces a 5 MiB response and sends all of it.
    OversizedFrame,
    /// Announces a 4 GiB response, sends 8 MiB of it, then stalls.
    HugeAnnouncedFrame,
    /// A frame whose payload is not a protobuf Response.
    GarbageProtobuf,
    /// A well-formed answer on a stream id nobody asked on.
    WrongStreamId,
}

fn header(len: u32, stream_id: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend(len.to_be_bytes());
    h.extend(stream_id.to_be_bytes());
    h.extend([MESSAGE_TYPE_RESPONSE, 0]);
    h
}

fn frame(stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = header(payload.len().try_into().unwrap(), stream_id);
    f.extend(payload);
    f
}

/// The next request frame from the shim: its stream id and method.
async fn read_request(stream: &mut UnixStream) -> std::io::Result<(u32, String)> {
    let mut h = [0u8; HEADER_LEN];
    stream.read_exact(&mut h).await?;
    let len = u32::from_be_bytes(h[..4].try_into().unwrap());
    let id = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let mut body = vec![0; len as usize];
    stream.read_exact(&mut body).await?;
    let req = Request::parse_from_bytes(&body).unwrap();
    Ok((id, req.method))
}

async fn misbehave(stream: &mut UnixStream, how: Hostile, id: u32) -> std::io::Result<()> {
    match how {
        Hostile::StallsMidFrame => stream.write_all(&header(64, id)[..5]).await,
        Hostile::OversizedFrame => {
            let len = 5 << 20;
            stream.write_all(&header(len, id)).await?;
            stream.write_all(&vec![0u8; len as usize]).await
        }
        Hostile::HugeAnnouncedFrame => {
            stream.write_all(&header(u32::MAX, id)).await?;
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..8 {
                stream.write_all(&chunk).await?;
            }
            Ok(())
        }
        Hostile::GarbageProtobuf => stream.write_all(&frame(id, &[0xff; 16])).await,
        Hostile::WrongStreamId => {
            let reply = Response::default().write_to_bytes().unwrap();
            stream.write_all(&frame(id + 100, &reply)).await
        }
    }
}

/// A hostile agent behind a fake hybrid-vsock socket in `dir`.
fn hostile_agent(dir: &Path, how: Hostile) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_connect_line(&mut stream).await;
                stream.write_all(b"OK 1024\n").await?;
                loop {
                    let (id, method) = read_request(&mut stream).await?;
                    if method != "Version" {
                        misbehave(&mut stream, how, id).await?;
                        break;
                    }
                    let version = VersionResponse {
                        protocol_version: PROTOCOL_VERSION,
                        agent_version: "hostile".into(),
                        ..Default::default()
                    };
                    let reply = Response {
                        payload: version.write_to_bytes().unwrap(),
                        ..Default::default()
                    };
                    stream
                        .write_all(&frame(id, &reply.write_to_bytes().unwrap()))
                        .await?;
                }
                tokio::time::sleep(STALL).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    path
}

/// Calls Check on a `how` agent: the error, with its causes, and how long
/// the call took.
async fn check_against(how: Hostile) -> (String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(dir.path(), how);
    let client = AgentClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap()
        .with_call_timeout(CALL);
    let started = Instant::now();
    let err = client.check().await.expect_err("a hostile answer");
    let took = started.elapsed();
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    // A missed deadline says so itself; every other failure is the call's.
    assert!(
        text.starts_with("agent call Check failed")
            || text.starts_with("the guest agent did not answer Check within 300ms"),
        "{text}"
    );
    (text, took)
}

#[tokio::test]
async fn sec_sock_05_a_peer_stalling_mid_frame_fails_the_call_at_its_deadline() {
    let (err, took) = check_against(Hostile::StallsMidFrame).await;
    assert!(err.contains("deadline"), "{err}");
    assert!(took >= CALL && took < CALL * 3, "{took:?}");
}

#[tokio::test]
async fn sec_sock_05_an_oversized_frame_is_refused_naming_its_size() {
    let (err, took) = check_against(Hostile::OversizedFrame).await;
    assert!(
        err.contains("5242880") && err.contains("exceed maximum message size"),
        "{err}"
    );
    assert!(took < CALL * 3, "{took:?}");
}

/// The announced 4 GiB are never asked for: the 8 MiB sent are discarded
/// in 4 KiB pieces and the call ends at its deadline.
#[tokio::test]
async fn sec_sock_05_a_4_gib_announcement_is_not_allocated_and_the_call_ends_in_time() {
    let (err, took) = check_against(Hostile::HugeAnnouncedFrame).await;
    assert!(err.contains("deadline"), "{err}");
    assert!(took < CALL * 3, "{took:?}");
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest < ALLOCATION_BOUND,
        "allocated {largest} bytes at once"
    );
}

#[tokio::test]
async fn sec_sock_05_garbage_protobuf_is_a_decode_error() {
    let (err, took) = check_against(Hostile::GarbageProtobuf).await;
    assert!(err.contains("Unpack response error"), "{err}");
    assert!(took < CALL, "{took:?}");
}

#[tokio::test]
async fn sec_sock_05_an_answer_on_a_wrong_stream_id_is_ignored_until_the_deadline() {
    let (err, took) = check_against(Hostile::WrongStreamId).await;
    assert!(err.contains("deadline"), "{err}");
    assert!(took >= CALL && took < CALL * 3, "{took:?}");
}

/// A peer that takes the connection and never answers even Version: the
/// connect gives up at its own deadline, saying the agent did not answer.
#[tokio::test]
async fn sec_sock_05_an_agent_silent_after_the_handshake_fails_the_connect_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_connect_line(&mut stream).await;
                let _ = stream.write_all(b"OK 1024\n").await;
                tokio::time::sleep(STALL).await;
            });
        }
    });
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = AgentClient::connect(&path, timeout).await.err().unwrap();
    let took = started.elapsed();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(took < timeout * 2, "{took:?}");
}
