//! The host side of the hybrid-vsock handshake (Cloud Hypervisor's and
//! vhost-device-vsock's): connect to the Unix socket, write
//! `CONNECT <port>\n`, read exactly one line, which must start with `OK `.
//!
//! The reply is read one byte at a time so that nothing past the newline is
//! consumed: what follows belongs to the ttrpc stream (a buffered reader
//! dropped after the handshake would silently eat the agent's first bytes).
//!
//! A connection whose `CONNECT` is not answered yet is never closed when
//! its attempt is given up (timed out, or its future dropped): it is handed
//! to a background task that keeps it open until the peer answers or
//! closes, or [`LINGER`] passes. vhost-device-vsock (0.3.0, and upstream
//! as of 2026-07) forwards the request to the guest and, when the guest
//! accepts, writes `OK <port>\n` with `write_all(..).unwrap()`
//! (vsock_conn.rs, `VSOCK_OP_RESPONSE`): if the host side has closed the
//! socket in between, the write fails with EPIPE and the device's only
//! vring worker thread panics. The process lives on and its socket still
//! accepts connections into the listen backlog, but nothing reads them:
//! every later `CONNECT` goes unanswered until the VM is stopped. On a
//! loaded host a TCG guest can take longer than an attempt's deadline to
//! answer, so an attempt given up just as the agent starts listening
//! wedged the VM's vsock for good.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest reply line accepted (`OK 4294967295\n` is 14 bytes).
pub const MAX_REPLY_LINE: usize = 64;

/// How long a given-up connection whose `CONNECT` is unanswered is kept
/// open at most (see the module documentation). Its task ends as soon as
/// the peer answers or closes: at the latest when the VM stops and its
/// vsock device exits.
pub const LINGER: Duration = Duration::from_secs(600);

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
/// positioned exactly after the `OK` line. A connection given up before
/// the peer answered lingers (see the module documentation).
pub async fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    connect_lingering(uds, port, timeout, LINGER).await
}

/// [`connect_hybrid_vsock`] with the linger bound as a parameter (tests).
pub(crate) async fn connect_lingering(
    uds: &Path,
    port: u32,
    timeout: Duration,
    linger: Duration,
) -> Result<UnixStream, HandshakeError> {
    let mut received = Vec::with_capacity(MAX_REPLY_LINE);
    let timed_out = |received: &[u8]| HandshakeError::Timeout {
        port,
        timeout,
        received: String::from_utf8_lossy(received).into_owned(),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = tokio::time::timeout_at(deadline, UnixStream::connect(uds))
        .await
        .map_err(|_| timed_out(&[]))?
        .map_err(|source| HandshakeError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    // From here until the peer answers, closing the socket may wedge the
    // peer: if this function returns early or its future is dropped, the
    // guard keeps the connection open in the background.
    let unanswered = Unanswered::arm(&stream, port, linger);
    let exchange = async {
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|source| HandshakeError::Io { port, source })?;
        read_reply_line(&mut stream, port, &mut received).await
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(())) => unanswered.disarm(),
        Ok(Err(e)) => {
            // The peer answered, closed or broke the connection: nothing
            // is pending on its side any more.
            unanswered.disarm();
            return Err(e);
        }
        Err(_) => return Err(timed_out(&received)),
    }
    check_reply(&received, port)?;
    Ok(stream)
}

/// Keeps a connection open past its handshake's end while the peer may
/// still answer its `CONNECT`: holds a duplicate of the socket's
/// descriptor, which is closed at once by [`Unanswered::disarm`] and
/// otherwise handed to a background task on drop (so the socket outlives
/// the caller's stream).
struct Unanswered {
    spare: Option<OwnedFd>,
    port: u32,
    linger: Duration,
}

impl Unanswered {
    fn arm(stream: &UnixStream, port: u32, linger: Duration) -> Self {
        let spare = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(port, error = %e, "cannot duplicate the hybrid-vsock socket; an abandoned CONNECT will close it at once");
                None
            }
        };
        Self {
            spare,
            port,
            linger,
        }
    }

    /// The peer has nothing pending: closing the socket is safe.
    fn disarm(mut self) {
        self.spare = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(fd) = self.spare.take() else {
            return;
        };
        let (port, linger) = (self.port, self.linger);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(linger_until_answered(fd, port, linger));
            }
            // No runtime: the process is shutting down, and its VMs with it.
            Err(_) => tracing::debug!(port, "no runtime to keep an unanswered CONNECT open"),
        }
    }
}

/// Reads (and drops) whatever the peer sends until its answer line ends,
/// it closes the connection, or `linger` passes; then closes `fd`.
async fn linger_until_answered(fd: OwnedFd, port: u32, linger: Duration) {
    let stream = std::os::unix::net::UnixStream::from(fd);
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(stream));
    let mut stream = match stream {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(port, error = %e, "cannot keep an unanswered CONNECT open");
            return;
        }
    };
    let drain = async {
        let mut buf = [0u8; MAX_REPLY_LINE];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return "closed by the peer",
                Ok(n) if buf[..n].contains(&b'\n') => return "answered",
                Ok(_) => {}
                Err(_) => return "broken",
            }
        }
    };
    let outcome = tokio::time::timeout(linger, drain)
        .await
        .unwrap_or("still unanswered at the linger deadline");
    tracing::debug!(port, outcome, "closing a given-up hybrid-vsock connection");
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
