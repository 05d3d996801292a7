//! A process's stdio: containerd's FIFOs on the host, pumped to and from
//! the agent's dedicated stdio streams (vsock port 1025, one connection
//! per stream; see agent.proto).
//!
//! Output is copied in pieces of up to [`CHUNK`] through a fixed buffer,
//! so a reader that falls behind holds the whole chain back (FIFO, vsock
//! credit, the guest's pipe, the process) rather than growing memory.
//! A process's exit is reported once its output streams end
//! ([`Pumps::drain`]): only a reader that stops taking anything, an
//! output nobody writes to any more, or one that flows on long after the
//! exit (a process left behind writing to it) ends the wait.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clh_agent_client::{open_stdio_stream as open_stream, StdioKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The most a pump copies at once: a few large writes wake containerd's
/// reader far less often than tokio's 8 KiB pieces.
const CHUNK: usize = 256 * 1024;
/// How often a drain looks at its streams' progress.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// When a drain stops waiting for a process's output to end.
#[derive(Debug, Clone, Copy)]
pub struct DrainBounds {
    /// The pump holds output that containerd's reader has taken none of
    /// for this long: the reader stopped; the rest is dropped.
    pub reader_stall: Duration,
    /// The agent has sent nothing for this long and the stream is still
    /// open: another process holds the output (a background child of an
    /// exec), or the VM is gone. Nothing is dropped: the pump goes on
    /// until the process is deleted.
    pub quiet: Duration,
    /// Output still flowing this long after the exit comes from processes
    /// that outlived it; the exit is reported and the pump goes on.
    pub flowing: Duration,
}

impl DrainBounds {
    /// A process that exited in a running VM.
    pub const EXITED: DrainBounds = DrainBounds {
        reader_stall: Duration::from_secs(10),
        quiet: Duration::from_secs(2),
        flowing: Duration::from_secs(60),
    };

    /// The VM died: the agent sends nothing more, only what the shim
    /// already holds is delivered.
    pub const VM_GONE: DrainBounds = DrainBounds {
        reader_stall: Duration::from_secs(10),
        quiet: Duration::ZERO,
        flowing: Duration::from_secs(10),
    };

    /// The longest a drain can take.
    pub const fn longest(&self) -> Duration {
        let stall = self.reader_stall.saturating_add(self.quiet);
        if stall.as_nanos() > self.flowing.as_nanos() {
            stall
        } else {
            self.flowing
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn wire(&self) -> clh_agent_protocol::Stdio {
        clh_agent_protocol::Stdio {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The pump tasks of one process. Output pumps end at the agent's EOF, or
/// when dropped (a drain cancelled half-way leaves none behind); the stdin
/// pump at the end of its FIFO; [`Pumps::abort`] ends all of them.
#[derive(Default)]
pub struct Pumps {
    stdin: Option<JoinHandle<()>>,
    stdin_path: Option<PathBuf>,
    outputs: Vec<OutputPump>,
}

/// One output stream's pump and how far it got.
struct OutputPump {
    kind: StdioKind,
    task: JoinHandle<()>,
    progress: Arc<Progress>,
}

impl Drop for OutputPump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a pump shares with a drain.
#[derive(Default)]
struct Progress {
    /// Bytes containerd's FIFO has taken.
    written: AtomicU64,
    /// The pump holds bytes the FIFO has not taken yet.
    holding: AtomicBool,
}

/// An output pump a drain watches: the bytes it had delivered when it
/// last moved, and when that was.
struct Watched {
    pump: OutputPump,
    written: u64,
    moved: Instant,
}

impl Pumps {
    /// Waits until the output streams end (the agent's EOF, every byte in
    /// containerd's FIFO), so that a process's last output reaches
    /// containerd before its exit is published, however much was still
    /// buffered. Ends early only as `bounds` say, and logs why.
    pub async fn drain(&mut self, bounds: DrainBounds) {
        let started = Instant::now();
        let mut watched: Vec<Watched> = std::mem::take(&mut self.outputs)
            .into_iter()
            .map(|pump| Watched {
                written: pump.progress.written.load(Ordering::Relaxed),
                moved: started,
                pump,
            })
            .collect();
        loop {
            watched.retain(|w| !w.pump.task.is_finished());
            let Some(first) = watched.first_mut() else {
                return;
            };
            // Awaiting the task itself: its end is seen at once, not at
            // the next poll.
            if tokio::time::timeout(DRAIN_POLL, &mut first.pump.task)
                .await
                .is_ok()
            {
                continue;
            }
            let now = Instant::now();
            let mut still = Vec::with_capacity(watched.len());
            for mut w in watched {
                let written = w.pump.progress.written.load(Ordering::Relaxed);
                if written != w.written {
                    (w.written, w.moved) = (written, now);
                }
                let idle = now - w.moved;
                let stream = w.pump.kind.as_str();
                if w.pump.progress.holding.load(Ordering::Relaxed) {
                    if idle >= bounds.reader_stall {
                        tracing::warn!(
                            stream,
                            delivered = written,
                            "containerd has read none of the process's {stream} for {:?} \
                             after its exit: giving up on it, the rest is lost",
                            bounds.reader_stall
                        );
                        w.pump.task.abort();
                        continue;
                    }
                } else if idle >= bounds.quiet {
                    tracing::debug!(
                        stream,
                        delivered = written,
                        "nothing more on the process's {stream} for {idle:?} after its exit, \
                         yet it is open (held by a process that outlived it?): reporting \
                         the exit, the stream is copied on until the process is deleted"
                    );
                    self.outputs.push(w.pump);
                    continue;
                }
                if now - started >= bounds.flowing {
                    tracing::warn!(
                        stream,
                        delivered = written,
                        "the process's {stream} still flows {:?} after its exit (a process \
                         that outlived it writes to it): reporting the exit, the stream is \
                         copied on until the process is deleted",
                        bounds.flowing
                    );
                    self.outputs.push(w.pump);
                    continue;
                }
                still.push(w);
            }
            watched = still;
        }
    }

    /// CloseIO: containerd has closed its end of the stdin FIFO. The pump
    /// copies what is still in the FIFO, then half-closes the stream (the
    /// agent sees EOF); aborting it here would lose that data. If the pump
    /// still waits for a writer to appear, it is released.
    pub fn close_stdin(&mut self) {
        self.unblock_stdin_open();
    }

    pub fn abort(&mut self) {
        if let Some(handle) = self.stdin.take() {
            handle.abort();
        }
        self.unblock_stdin_open();
        for pump in self.outputs.drain(..) {
            pump.task.abort();
        }
    }

    /// A stdin pump may sit in a blocking open() of the FIFO until
    /// containerd opens its end; opening the write end ourselves releases it.
    fn unblock_stdin_open(&mut self) {
        if let Some(path) = self.stdin_path.take() {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(path);
        }
    }
}

/// Opens the agent's streams for the process and starts the pumps. Call
/// between Create/Exec and Start: the agent holds output until then.
pub async fn attach(
    uds: &Path,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> anyhow::Result<Pumps> {
    let mut pumps = Pumps::default();
    let result = async {
        if !paths.stdout.is_empty() {
            let stream = open_stream(uds, container_id, exec_id, StdioKind::Stdout).await?;
            let fifo = open_output(&paths.stdout)?;
            pumps
                .outputs
                .push(OutputPump::start(StdioKind::Stdout, stream, fifo));
        }
        if !paths.stderr.is_empty() && !paths.terminal {
            let stream = open_stream(uds, container_id, exec_id, StdioKind::Stderr).await?;
            let fifo = open_output(&paths.stderr)?;
            pumps
                .outputs
                .push(OutputPump::start(StdioKind::Stderr, stream, fifo));
        }
        if !paths.stdin.is_empty() {
            let stream = open_stream(uds, container_id, exec_id, StdioKind::Stdin).await?;
            pumps.stdin_path = Some(PathBuf::from(&paths.stdin));
            pumps.stdin = Some(tokio::spawn(pump_in(PathBuf::from(&paths.stdin), stream)));
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(pumps),
        Err(e) => {
            pumps.abort();
            Err(e)
        }
    }
}

/// Opens containerd's output FIFO read-write, as containerd's own runc
/// shim keeps a read end open beside its write end: the FIFO then always
/// has a reader, so a write while containerd restarts (its reader closed,
/// the new one not yet open) waits in the FIFO instead of failing with
/// EPIPE, which would end the pump and lose all later output. This end is
/// never read from.
fn open_output(path: &str) -> anyhow::Result<tokio::net::unix::pipe::Sender> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .with_context(|| format!("cannot open the FIFO {path}"))
}

impl OutputPump {
    fn start(kind: StdioKind, stream: UnixStream, fifo: tokio::net::unix::pipe::Sender) -> Self {
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(pump_out(stream, fifo, progress.clone()));
        OutputPump {
            kind,
            task,
            progress,
        }
    }
}

/// Copies the agent's stream into containerd's FIFO until EOF, counting
/// what the FIFO takes.
async fn pump_out(
    mut stream: UnixStream,
    mut fifo: tokio::net::unix::pipe::Sender,
    progress: Arc<Progress>,
) {
    let mut buf = vec![0u8; CHUNK];
    let copied = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            progress.holding.store(true, Ordering::Relaxed);
            let mut piece = &buf[..n];
            while !piece.is_empty() {
                let w = fifo.write(piece).await?;
                if w == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                piece = &piece[w..];
                progress.written.fetch_add(w as u64, Ordering::Relaxed);
            }
            progress.holding.store(false, Ordering::Relaxed);
        }
    };
    if let Err(e) = copied.await {
        tracing::debug!(error = %e, "output stream ended");
    }
}

/// Opens the FIFO for reading (blocks until containerd opens its end),
/// copies it to the agent and half-closes the stream at EOF.
async fn pump_in(path: PathBuf, mut stream: UnixStream) {
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await;
    let file = match opened {
        Ok(Ok(file)) => file,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open the stdin FIFO");
            return;
        }
        Err(_) => return,
    };
    let mut file = BufReader::with_capacity(CHUNK, tokio::fs::File::from_std(file));
    if let Err(e) = tokio::io::copy_buf(&mut file, &mut stream).await {
        tracing::debug!(error = %e, "stdin stream ended");
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
#[path = "stdio_tests.rs"]
mod tests;
