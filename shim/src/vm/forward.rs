//! The host half of port forwarding (see clh-network's forward.rs): each
//! connection containerd makes to the pod's loopback, redirected to our
//! listener, becomes a stream to the guest agent's forward port (1026),
//! which connects to the same port on the guest's loopback.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

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
    let port = match clh_network::original_port(&conn) {
        Ok(port) => port,
        Err(e) => {
            warn!(error = %e, "port forward refused");
            return;
        }
    };
    match clh_agent_client::open_forward_stream(&vsock, port).await {
        Ok(mut guest) => {
            debug!(port, "port forward open");
            if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
                debug!(port, error = %e, "port forward ended");
            }
        }
        // The client sees its connection closed; the reason is logged.
        Err(e) => warn!(error = %e, "port forward refused"),
    }
}
