//! A process's stdio: containerd's FIFOs on the host, pumped to and from
//! the agent's dedicated stdio streams (vsock port 1025, one connection
//! per stream; see agent.proto).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clh_agent_client::{open_stdio_stream as open_stream, StdioKind};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// Deadline of opening an output FIFO.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The pump tasks of one process. Dropping it does not stop them: output
/// pumps end at the agent's EOF; [`Pumps::abort`] ends all of them.
#[derive(Default)]
pub struct Pumps {
    stdin: Option<JoinHandle<()>>,
    stdin_path: Option<PathBuf>,
    outputs: Vec<JoinHandle<()>>,
}

impl Pumps {
    /// Waits (bounded) for the output streams to drain, so that a process's
    /// last output reaches containerd before its exit is published.
    pub async fn drain(&mut self, timeout: Duration) {
        for handle in self.outputs.iter_mut() {
            if tokio::time::timeout(timeout, &mut *handle).await.is_err() {
                handle.abort();
            }
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
        for handle in self.outputs.drain(..) {
            handle.abort();
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
            let fifo = open_output(&paths.stdout).await?;
            pumps.outputs.push(tokio::spawn(pump_out(stream, fifo)));
        }
        if !paths.stderr.is_empty() && !paths.terminal {
            let stream = open_stream(uds, container_id, exec_id, StdioKind::Stderr).await?;
            let fifo = open_output(&paths.stderr).await?;
            pumps.outputs.push(tokio::spawn(pump_out(stream, fifo)));
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

/// containerd's reader is open before Create, so a non-blocking open of the
/// write end succeeds; ENXIO (no reader yet) is retried until the deadline.
async fn open_output(path: &str) -> anyhow::Result<tokio::net::unix::pipe::Sender> {
    let deadline = tokio::time::Instant::now() + ATTACH_TIMEOUT;
    loop {
        match tokio::net::unix::pipe::OpenOptions::new().open_sender(path) {
            Ok(sender) => return Ok(sender),
            Err(e)
                if e.raw_os_error() == Some(nix::libc::ENXIO)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open the FIFO {path}")),
        }
    }
}

async fn pump_out(mut stream: UnixStream, mut fifo: tokio::net::unix::pipe::Sender) {
    if let Err(e) = tokio::io::copy(&mut stream, &mut fifo).await {
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
    let mut file = tokio::fs::File::from_std(file);
    if let Err(e) = tokio::io::copy(&mut file, &mut stream).await {
        tracing::debug!(error = %e, "stdin stream ended");
    }
    let _ = stream.shutdown().await;
}
