//! The output pumps and their drain, over a real FIFO and socket pair:
//! a reader that pauses gets everything before the drain ends; one that
//! stops is given up after the stall bound; an output held open, or still
//! flowing, is left to its pump rather than cut.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

use super::*;

/// A FIFO with its read end open, and a pump from a fresh socket into it;
/// returns the agent's end of the socket, the reader and the pumps.
async fn pumped(dir: &tempfile::TempDir) -> (UnixStream, pipe::Receiver, Pumps) {
    let path = dir.path().join("out");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
    let fifo = open_output(path.to_str().unwrap()).unwrap();
    let (agent, shim) = UnixStream::pair().unwrap();
    let pumps = Pumps {
        outputs: vec![OutputPump::start(StdioKind::Stdout, shim, fifo)],
        ..Default::default()
    };
    (agent, reader, pumps)
}

fn bounds(reader_stall_ms: u64, quiet_ms: u64, flowing_ms: u64) -> DrainBounds {
    DrainBounds {
        reader_stall: Duration::from_millis(reader_stall_ms),
        quiet: Duration::from_millis(quiet_ms),
        flowing: Duration::from_millis(flowing_ms),
    }
}

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_paused_reader_gets_everything_before_the_drain_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut reader, mut pumps) = pumped(&dir).await;
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    tokio::spawn(async move {
        agent.write_all(&sent).await.unwrap();
        // Dropping it is the agent's EOF: the process exited.
    });
    let read = tokio::spawn(async move {
        // Longer than the quiet bound: a pump holding output is waited for.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        got
    });
    pumps.drain(bounds(5_000, 300, 30_000)).await;
    assert!(pumps.outputs.is_empty(), "the stream ended");
    assert_eq!(read.await.unwrap(), data);
}

/// containerd restarting: its reader closes, the process writes, then the
/// new containerd opens the FIFO again and gets what was written meanwhile
/// and after (REL-CTRD-01; a write-only end failed with EPIPE, which ended
/// the pump).
#[tokio::test]
async fn output_written_while_the_reader_is_away_reaches_the_next_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, reader, mut pumps) = pumped(&dir).await;
    drop(reader);
    agent.write_all(b"while away\n").await.unwrap();
    // The pump has taken it from the socket and written it to the FIFO:
    // its count says so (a failed write would have ended the pump).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pumps.outputs[0].progress.written.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = dir.path().join("out");
    let mut next = pipe::OpenOptions::new().open_receiver(&path).unwrap();
    agent.write_all(b"and after\n").await.unwrap();
    drop(agent);
    pumps.drain(bounds(5_000, 300, 30_000)).await;
    let mut got = Vec::new();
    next.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"while away\nand after\n");
}

#[tokio::test]
async fn a_reader_that_stops_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _reader, mut pumps) = pumped(&dir).await;
    tokio::spawn(async move {
        // More than the FIFO and the socket hold: the pump is left holding.
        let _ = agent.write_all(&vec![7u8; 4 * MIB]).await;
    });
    let started = std::time::Instant::now();
    pumps.drain(bounds(500, 100, 30_000)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(pumps.outputs.is_empty(), "the pump was aborted");
}

#[tokio::test]
async fn an_output_held_open_is_left_to_its_pump() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut reader, mut pumps) = pumped(&dir).await;
    agent.write_all(b"before").await.unwrap();
    pumps.drain(bounds(5_000, 300, 30_000)).await;
    assert_eq!(pumps.outputs.len(), 1, "the pump goes on");
    // What the survivor writes later still arrives, until abort().
    agent.write_all(b" after").await.unwrap();
    drop(agent);
    let mut got = Vec::new();
    reader.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"before after");
    pumps.abort();
    assert!(pumps.outputs.is_empty());
}

#[tokio::test]
async fn output_flowing_on_ends_the_wait_not_the_pump() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut reader, mut pumps) = pumped(&dir).await;
    let writer = tokio::spawn(async move {
        while agent.write_all(b"tick\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let drain_reader = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while reader.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let started = std::time::Instant::now();
    pumps.drain(bounds(5_000, 1_000, 600)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(pumps.outputs.len(), 1, "the pump goes on");
    pumps.abort();
    writer.abort();
    let _ = drain_reader.await;
}

#[test]
fn the_longest_drain_is_bounded() {
    assert_eq!(DrainBounds::EXITED.longest(), Duration::from_secs(60));
    assert_eq!(DrainBounds::VM_GONE.longest(), Duration::from_secs(10));
    assert!(DrainBounds::VM_GONE.quiet.is_zero());
}
