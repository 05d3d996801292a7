//! The port-forward server (vsock port 1026; wire format in agent.proto):
//! one connection per forwarded TCP connection, `tcp <port>\n`, then the
//! agent connects to that port on the guest's loopback and splices.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::stdio_server::read_header;

/// A peer that connects must send its line within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the guest's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the host's connections on vsock `port` forever.
pub fn serve_vsock(port: u32) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    info!("serving port forwards on vsock port {port}");
    tokio::spawn(async move {
        loop {
            match crate::vsock_peer::accept_from_host(&listener).await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream));
                }
                Err(e) => {
                    warn!("port-forward accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// `tcp <port>` with a port in 1..=65535.
pub(crate) fn parse_request(line: &str) -> Result<u16, String> {
    let port = line
        .strip_prefix("tcp ")
        .ok_or_else(|| format!("malformed request {line:?} (expected `tcp <port>`)"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("invalid port {port:?}")),
    }
}

/// Connects to `port` on 127.0.0.1, else on ::1.
async fn connect_loopback(port: u16) -> Result<TcpStream, String> {
    let mut last = String::new();
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = format!("connecting to {addr} in the guest: {e}"),
            Err(_) => {
                last = format!(
                    "connecting to {addr} in the guest: no answer within {CONNECT_TIMEOUT:?}"
                )
            }
        }
    }
    Err(last)
}

pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let request = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut s)).await {
        Ok(line) => line,
        Err(_) => Err("no request within the deadline".into()),
    };
    let target = match request.and_then(|line| parse_request(&line)) {
        Ok(port) => connect_loopback(port).await,
        Err(e) => Err(e),
    };
    let mut target = match target {
        Ok(target) => target,
        Err(reason) => {
            debug!("port forward refused: {reason}");
            let _ = s.write_all(format!("ERR {reason}\n").as_bytes()).await;
            return;
        }
    };
    if s.write_all(b"OK\n").await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut s, &mut target).await {
        debug!("port forward ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    #[test]
    fn only_a_tcp_port_is_a_request() {
        assert_eq!(parse_request("tcp 80"), Ok(80));
        for bad in [
            "tcp 0",
            "tcp 65536",
            "udp 53",
            "tcp",
            "tcp 80 x",
            "tcp -1",
            "",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    /// A server on the loopback only is reached, bytes cross both ways; a
    /// closed port is an `ERR` line naming it.
    #[tokio::test]
    async fn a_forward_reaches_a_loopback_server_and_a_closed_port_is_refused() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.unwrap();
            c.write_all(b"pong").await.unwrap();
        });
        let (host, guest) = tokio::io::duplex(1024);
        tokio::spawn(handle(guest));
        let mut host = BufReader::new(host);
        host.get_mut()
            .write_all(format!("tcp {port}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        host.read_line(&mut line).await.unwrap();
        assert_eq!(line, "OK\n");
        host.get_mut().write_all(b"ping").await.unwrap();
        let mut reply = [0u8; 4];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"pong");

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let (host, guest) = tokio::io::duplex(1024);
        tokio::spawn(handle(guest));
        let mut host = BufReader::new(host);
        host.get_mut()
            .write_all(format!("tcp {closed_port}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        host.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("ERR "), "{line}");
        assert!(line.contains(&closed_port.to_string()), "{line}");
    }
}
