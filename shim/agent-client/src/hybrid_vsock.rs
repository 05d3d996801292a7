//! The host side of the hybrid-vsock handshake (Cloud Hypervisor's and
//! vhost-device-vsock's): connect to the Unix socket, write
//! `CONNECT <port>\n`, read exactly one line, which must start with `OK `.
//!
//! The reply is read one byte at a time so that nothing past the newline is
//! consumed: what follows belongs to the ttrpc stream (a buffered reader
//! dropped after the handshake would silently eat the agent's first bytes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest reply line accepted (`OK 4294967295\n` is 14 bytes).
pub const MAX_REPLY_LINE: usize = 64;

/// How a hybrid-vsock handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect to the hybrid-vsock socket {path}: is the VM running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the hybrid-vsock peer closed the connection before answering CONNECT {port} (no listener on that port in the guest yet?)")]
    PeerClosed { port: u32 },

    #[error(
        "no complete answer to CONNECT {port} within {timeout:?} (received so far: {received:?})"
    )]
    Timeout {
        port: u32,
        timeout: Duration,
        received: String,
    },

    #[error("unexpected answer to CONNECT {port}: {reply:?} (expected \"OK <port>\")")]
    Garbage { port: u32, reply: String },

    #[error("the answer to CONNECT {port} is longer than {MAX_REPLY_LINE} bytes without a newline (starts {reply:?})")]
    LineTooLong { port: u32, reply: String },

    #[error("hybrid-vsock socket I/O failed during CONNECT {port}")]
    Io {
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

impl HandshakeError {
    /// Whether trying again may succeed while the guest is still booting:
    /// the host side accepts the connection and then closes it, stays
    /// silent or answers garbage until the agent listens.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            Self::PeerClosed { .. } | Self::Timeout { .. } | Self::Garbage { .. } => true,
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            Self::LineTooLong { .. } => false,
        }
    }
}

/// Connects to the hybrid-vsock socket `uds` and asks for guest `port`. The
/// whole handshake is bounded by `timeout`. On success the stream is
/// positioned exactly after the `OK` line.
pub async fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let handshake = async {
        let mut stream =
            UnixStream::connect(uds)
                .await
                .map_err(|source| HandshakeError::Connect {
                    path: uds.to_path_buf(),
                    source,
                })?;
        let io = |source| HandshakeError::Io { port, source };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(io)?;
        Ok::<_, HandshakeError>(stream)
    };
    let mut received = Vec::with_capacity(MAX_REPLY_LINE);
    let timed_out = |received: &[u8]| HandshakeError::Timeout {
        port,
        timeout,
        received: String::from_utf8_lossy(received).into_owned(),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| timed_out(&[]))??;
    let read_line = read_reply_line(&mut stream, port, &mut received);
    match tokio::time::timeout_at(deadline, read_line).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(timed_out(&received)),
    }
    check_reply(&received, port)?;
    Ok(stream)
}

/// Whether the reply line `line` (without its newline) to `CONNECT port`
/// accepts the connection: it must start with `OK `.
#[doc(hidden)]
pub fn check_reply(line: &[u8], port: u32) -> Result<(), HandshakeError> {
    let line = String::from_utf8_lossy(line);
    if line.starts_with("OK ") {
        Ok(())
    } else {
        Err(HandshakeError::Garbage {
            port,
            reply: truncate(&line),
        })
    }
}

/// Reads up to and including the first `\n` into `line` (without it), one
/// byte per read so nothing after the newline is consumed.
#[doc(hidden)]
pub async fn read_reply_line(
    stream: &mut (impl AsyncRead + Unpin),
    port: u32,
    line: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|source| HandshakeError::Io { port, source })?;
        if n == 0 {
            return Err(if line.is_empty() {
                HandshakeError::PeerClosed { port }
            } else {
                HandshakeError::Garbage {
                    port,
                    reply: truncate(&String::from_utf8_lossy(line)),
                }
            });
        }
        if byte[0] == b'\n' {
            return Ok(());
        }
        if line.len() >= MAX_REPLY_LINE {
            return Err(HandshakeError::LineTooLong {
                port,
                reply: truncate(&String::from_utf8_lossy(line)),
            });
        }
        line.push(byte[0]);
    }
}

/// At most 32 characters of a peer's reply, for error messages.
fn truncate(s: &str) -> String {
    const SHOWN: usize = 32;
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
