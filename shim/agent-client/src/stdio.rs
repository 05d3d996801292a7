//! Stdio streams and port forwards (agent.proto's wire format; opened as
//! header_stream.rs says): for stdio the header names the process and the
//! stream, for a forward the guest's TCP port.

use std::path::Path;
use std::time::Duration;

use clh_agent_protocol::STDIO_VSOCK_PORT;
use tokio::net::UnixStream;

use crate::{header_stream, Error, Result};

/// Deadline of connect + header + answer.
pub const STDIO_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioKind {
    /// Host → guest; half-close the stream (shutdown write) for EOF.
    Stdin,
    /// Guest → host (the tty, with a terminal); EOF when the process's
    /// stdout is closed.
    Stdout,
    /// Guest → host; absent with a terminal.
    Stderr,
}

impl StdioKind {
    /// Its name on the wire (and in logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Opens one stdio stream of process (container_id, exec_id; "" = init)
/// through the hybrid-vsock socket `uds`. Attach every stream the process
/// was created with before starting it: the agent holds output until then.
pub async fn open_stdio_stream(
    uds: &Path,
    container_id: &str,
    exec_id: &str,
    kind: StdioKind,
) -> Result<UnixStream> {
    open_stdio_stream_on(uds, STDIO_VSOCK_PORT, container_id, exec_id, kind).await
}

/// [`open_stdio_stream`] on another port (tests).
pub async fn open_stdio_stream_on(
    uds: &Path,
    port: u32,
    container_id: &str,
    exec_id: &str,
    kind: StdioKind,
) -> Result<UnixStream> {
    let stream_name = format!(
        "{} of {container_id}/{}",
        kind.as_str(),
        if exec_id.is_empty() { "init" } else { exec_id }
    );
    let exec = if exec_id.is_empty() { "-" } else { exec_id };
    let header = format!("{container_id} {exec} {}", kind.as_str());
    let refused = |reason| Error::Stdio {
        stream: stream_name.clone(),
        reason,
    };
    header_stream::open(uds, port, &header, STDIO_OPEN_TIMEOUT, refused).await
}

/// Deadline of connect + request + answer of a port forward.
pub const FORWARD_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a port forward to TCP `port` on the guest's loopback (agent.proto:
/// `tcp <port>` on FORWARD_VSOCK_PORT): once it returns, the stream carries
/// that connection both ways.
pub async fn open_forward_stream(uds: &Path, port: u16) -> Result<UnixStream> {
    let refused = |reason| Error::Forward { port, reason };
    let header = format!("tcp {port}");
    let vsock_port = clh_agent_protocol::FORWARD_VSOCK_PORT;
    header_stream::open(uds, vsock_port, &header, FORWARD_OPEN_TIMEOUT, refused).await
}
