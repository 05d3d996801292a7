//! Stdio streams (agent.proto's wire format): a hybrid-vsock connection to
//! STDIO_VSOCK_PORT, one header line naming the process and the stream, and
//! the agent's `OK` or `ERR <reason>`; then raw bytes.

use std::path::Path;
use std::time::Duration;

use clh_agent_protocol::STDIO_VSOCK_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{connect_hybrid_vsock, Error, Result};

/// Deadline of connect + header + answer.
pub const STDIO_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest answer line read (an `ERR` line carries a reason).
const MAX_ANSWER: usize = 1024;

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
    fn as_str(self) -> &'static str {
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
    let deadline = tokio::time::Instant::now() + STDIO_OPEN_TIMEOUT;
    let mut stream = connect_hybrid_vsock(uds, port, STDIO_OPEN_TIMEOUT)
        .await
        .map_err(Error::Handshake)?;
    let exec = if exec_id.is_empty() { "-" } else { exec_id };
    let header = format!("{container_id} {exec} {}\n", kind.as_str());
    let exchange = async {
        stream.write_all(header.as_bytes()).await?;
        read_answer(&mut stream).await
    };
    let answer = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| Error::Stdio {
            stream: stream_name.clone(),
            reason: format!("no answer within {STDIO_OPEN_TIMEOUT:?}"),
        })?
        .map_err(|e| Error::Stdio {
            stream: stream_name.clone(),
            reason: e.to_string(),
        })?;
    match answer.as_str() {
        "OK" => Ok(stream),
        other => Err(Error::Stdio {
            stream: stream_name,
            reason: other.strip_prefix("ERR ").unwrap_or(other).to_owned(),
        }),
    }
}

/// One line, a byte per read: what follows it is stream data.
async fn read_answer(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "agent closed the stream before answering (got {:?})",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_ANSWER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        line.push(byte[0]);
    }
}
