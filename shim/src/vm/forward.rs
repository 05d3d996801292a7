//! The host half of port forwarding (see clh-network's forward.rs): each
//! connection containerd makes to the pod's loopback, redirected to our
//! listener, becomes a stream to the guest agent's forward port (1026),
//! which connects to the same port on the guest's loopback.

use std::path::PathBuf;
use std::time::Duration;

use clh_agent_client::connect_hybrid_vsock;
use clh_agent_protocol::FORWARD_VSOCK_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Deadline of the vsock handshake and of the agent's answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's answer is `OK` or `ERR <reason>`: one short line.
const MAX_ANSWER: usize = 512;

/// Serves the interceptor's listener until the VM stops (it owns this
/// task).
pub(super) async fn serve(listener: TcpListener, vsock: PathBuf) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(forward(conn, vsock.clone()));
            }
            Err(e) => {
                warn!(error = %e, "port forward: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward(mut conn: TcpStream, vsock: PathBuf) {
    let opened = async {
        let port = clh_network::original_port(&conn).map_err(|e| e.to_string())?;
        let mut guest = connect_hybrid_vsock(&vsock, FORWARD_VSOCK_PORT, OPEN_TIMEOUT)
            .await
            .map_err(|e| format!("port {port}: {e}"))?;
        guest
            .write_all(format!("tcp {port}\n").as_bytes())
            .await
            .map_err(|e| format!("port {port}: {e}"))?;
        let answer = tokio::time::timeout(OPEN_TIMEOUT, read_line(&mut guest))
            .await
            .map_err(|_| {
                format!("port {port}: the agent did not answer within {OPEN_TIMEOUT:?}")
            })?;
        match answer?.as_str() {
            "OK" => Ok((port, guest)),
            other => Err(format!("port {port}: {other}")),
        }
    };
    match opened.await {
        Ok((port, mut guest)) => {
            debug!(port, "port forward open");
            if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
                debug!(port, error = %e, "port forward ended");
            }
        }
        // The client sees its connection closed; the reason is logged.
        Err(reason) => warn!("port forward refused: {reason}"),
    }
}

/// One line, read a byte at a time (what follows belongs to the stream).
async fn read_line(s: &mut tokio::net::UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("agent answer: {e}"))?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_ANSWER {
            return Err("agent answer too long".into());
        }
        line.push(b);
    }
}
