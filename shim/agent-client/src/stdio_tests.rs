//! open_stdio_stream against fake hybrid-vsock peers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::{open_stdio_stream_on, Error, StdioKind};

const PORT: u32 = 1025;

async fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A fake agent: checks the CONNECT and header lines, then sends `answer`
/// and (after an OK) echoes the header back as stream data.
fn fake_stdio_peer(dir: &Path, want_header: &'static str, answer: &'static [u8]) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        assert_eq!(read_line(&mut s).await, format!("CONNECT {PORT}"));
        s.write_all(b"OK 1025\n").await.unwrap();
        assert_eq!(read_line(&mut s).await, want_header);
        s.write_all(answer).await.unwrap();
        if answer.starts_with(b"OK") {
            s.write_all(b"data").await.unwrap();
        }
    });
    path
}

#[tokio::test]
async fn ok_leaves_the_stream_at_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_stdio_peer(dir.path(), "c1 - stdout", b"OK\n");
    let mut s = open_stdio_stream_on(&path, PORT, "c1", "", StdioKind::Stdout)
        .await
        .unwrap();
    let mut data = String::new();
    s.read_to_string(&mut data).await.unwrap();
    assert_eq!(data, "data");
}

#[tokio::test]
async fn err_carries_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_stdio_peer(
        dir.path(),
        "c1 e1 stdin",
        b"ERR container \"c1\" not found\n",
    );
    let err = open_stdio_stream_on(&path, PORT, "c1", "e1", StdioKind::Stdin)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Stdio { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("stdin of c1/e1") && msg.contains("not found"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_peer_closing_before_answering_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = fake_stdio_peer(dir.path(), "c1 - stderr", b"");
    let started = std::time::Instant::now();
    let err = open_stdio_stream_on(&path, PORT, "c1", "", StdioKind::Stderr)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("before answering"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
