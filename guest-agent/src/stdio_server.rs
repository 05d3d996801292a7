//! The stdio stream server (vsock port 1025; wire format in agent.proto):
//! one connection per stream, a header line naming the process and the
//! stream, `OK\n` or `ERR <reason>\n`, then raw bytes until EOF.

use crate::containers::process::StreamKind;
use crate::containers::Containers;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tracing::{debug, info, warn};

/// The longest header accepted: two ids (at most
/// [`clh_agent_protocol::MAX_ID_LEN`] bytes each) and a kind, with room.
const MAX_HEADER: usize = 300;
/// A peer that connects must send its header within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a stream reads at once (an output pipe holds 1 MiB:
/// process.rs): a few large reads and wake-ups rather than tokio's 8 KiB
/// pieces. The buffer is fixed, so a slow peer still holds the writer
/// back.
pub(crate) const CHUNK: usize = 256 * 1024;
/// The most written to the vsock at once: the guest kernel sends a larger
/// write as a non-linear skb (over 32 KiB with its headers), spread over
/// several descriptors, which vhost-device-vsock 0.3 drops without a
/// word, and the stream stalls for want of credit. Still 3 times fewer
/// packets than tokio's 8 KiB.
const VSOCK_PIECE: usize = 24 * 1024;

/// Accepts the host's connections on vsock `port` forever.
pub fn serve_vsock(port: u32, containers: Containers) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    info!("serving stdio streams on vsock port {port}");
    tokio::spawn(async move {
        loop {
            match crate::vsock_peer::accept_from_host(&listener).await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, containers.clone()));
                }
                Err(e) => {
                    warn!("stdio accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// Reads the header one byte at a time (nothing after it may be consumed:
/// it is stdin data).
pub(crate) async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("reading header: {e}"))?;
        if b == b'\n' {
            return String::from_utf8(line).map_err(|_| "header is not UTF-8".into());
        }
        if line.len() >= MAX_HEADER {
            return Err(format!("header longer than {MAX_HEADER} bytes"));
        }
        line.push(b);
    }
}

/// `<container_id> <exec_id or -> <kind>`.
pub(crate) fn parse_header(line: &str) -> Result<(&str, &str, StreamKind), String> {
    let mut parts = line.split(' ');
    let (Some(id), Some(exec), Some(kind), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed header {line:?}"));
    };
    let kind = StreamKind::parse(kind).ok_or_else(|| format!("unknown stream {kind:?}"))?;
    let exec = if exec == "-" { "" } else { exec };
    Ok((id, exec, kind))
}

pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, containers: Containers) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut s)).await {
        Ok(h) => h,
        Err(_) => Err("no header within the deadline".into()),
    };
    let attach = header.and_then(|line| {
        let (id, exec, kind) = parse_header(&line)?;
        let proc = containers.process(id, exec).map_err(|e| e.to_string())?;
        if !proc.attachable(kind) {
            return Err(format!("{line}: stream not requested or already attached"));
        }
        Ok((line.clone(), proc, kind))
    });
    let (line, proc, kind) = match attach {
        Ok(a) => a,
        Err(reason) => {
            debug!("stdio attach refused: {reason}");
            let msg = format!("ERR {}\n", reason.replace('\n', " "));
            let _ = s.write_all(msg.as_bytes()).await;
            return;
        }
    };
    if s.write_all(b"OK\n").await.is_err() {
        return;
    }
    // A terminal's master only exists once the process is started.
    let Some(fd) = proc.take_end_when_ready(kind).await else {
        debug!("stdio {line}: process gone before its stream was ready");
        return;
    };
    debug!("stdio attached: {line}");
    let result = match kind {
        StreamKind::Stdin => {
            let copy = async {
                let mut from = BufReader::with_capacity(CHUNK, &mut s);
                if is_fifo(&fd) {
                    let mut tx = pipe::Sender::from_owned_fd(fd)?;
                    tokio::io::copy_buf(&mut from, &mut tx).await?;
                } else {
                    let mut tx = tokio::fs::File::from_std(fd.into());
                    tokio::io::copy_buf(&mut from, &mut tx).await?;
                }
                Ok::<_, std::io::Error>(())
            };
            // Dropping the pipe end on either branch is the process's EOF.
            tokio::select! {
                r = copy => r,
                () = proc.stdin_close.notified() => Ok(()),
            }
        }
        StreamKind::Stdout | StreamKind::Stderr => {
            let copy = async {
                if is_fifo(&fd) {
                    copy_out(pipe::Receiver::from_owned_fd(fd)?, &mut s).await?;
                } else {
                    copy_tty(tokio::fs::File::from_std(fd.into()), &mut s).await?;
                }
                s.shutdown().await
            };
            copy.await
        }
    };
    if let Err(e) = result {
        // The shim going away mid-stream is normal at teardown.
        debug!("stdio stream {line} ended: {e}");
    }
}

fn is_fifo(fd: &std::os::fd::OwnedFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode)
            .contains(nix::sys::stat::SFlag::S_IFIFO)
    })
}

/// Copies a pty master to the stream. Once every slave fd is closed the
/// master reads EIO, which is a terminal's end of file.
async fn copy_tty<W: AsyncWrite + Unpin>(
    mut master: tokio::fs::File,
    out: &mut W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match master.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
            Err(e) => return Err(e),
        };
        write_pieces(out, &buf[..n]).await?;
    }
}

/// Copies a process's output pipe to the stream until EOF: reads of up to
/// [`CHUNK`], written in [`VSOCK_PIECE`]s.
async fn copy_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    out: &mut W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_pieces(out, &buf[..n]).await?;
    }
}

async fn write_pieces<W: AsyncWrite + Unpin>(out: &mut W, data: &[u8]) -> std::io::Result<()> {
    for piece in data.chunks(VSOCK_PIECE) {
        out.write_all(piece).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        assert_eq!(
            parse_header("c1 - stdout").unwrap(),
            ("c1", "", StreamKind::Stdout)
        );
        assert_eq!(
            parse_header("c1 e1 stdin").unwrap(),
            ("c1", "e1", StreamKind::Stdin)
        );
        assert!(parse_header("c1 - tty").is_err());
        assert!(parse_header("c1 stdout").is_err());
        assert!(parse_header("c1 - stdout x").is_err());
    }

    #[tokio::test]
    async fn unknown_container_gets_err() {
        let (mut a, b) = tokio::io::duplex(256);
        let containers = Containers::new(crate::reaper::Reaper::default());
        let server = tokio::spawn(handle(b, containers));
        a.write_all(b"nope - stdout\n").await.unwrap();
        let mut reply = String::new();
        a.read_to_string(&mut reply).await.unwrap();
        assert!(
            reply.starts_with("ERR container \"nope\" not found"),
            "{reply}"
        );
        server.await.unwrap();
    }
}
