//! Only the host may talk to the agent over vsock (SEC-SOCK-04).
//!
//! The shim reaches the agent through hybrid vsock: the VMM (Cloud
//! Hypervisor, or vhost-device-vsock beside QEMU) turns a connection on the
//! host's Unix socket into a vsock connection whose peer is always the host,
//! CID 2. Anything else that reaches the agent's ports comes from inside the
//! guest: a container connecting through vsock loopback (CID 1) or to the
//! guest's own CID. Such a peer would otherwise drive the whole agent API
//! (create containers, exec into its neighbours, read their stdio), so both
//! listeners (ttrpc and stdio) close every connection that is not from CID 2.

use futures_util::stream::Stream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_HOST};
use tracing::warn;

/// Whether a connection from `cid` may use the agent: only the host's.
pub fn admits(cid: u32) -> bool {
    cid == VMADDR_CID_HOST
}

/// The next connection from the host; any other peer is closed and logged.
pub async fn accept_from_host(
    listener: &VsockListener,
) -> std::io::Result<(VsockStream, VsockAddr)> {
    loop {
        let (stream, peer) = listener.accept().await?;
        if admits(peer.cid()) {
            return Ok((stream, peer));
        }
        let port = listener.local_addr().map_or(0, |a| a.port());
        warn!(
            peer_cid = peer.cid(),
            peer_port = peer.port(),
            port,
            "refused a vsock connection that does not come from the host (CID {VMADDR_CID_HOST})"
        );
        drop(stream);
    }
}

/// The host's connections on `listener`, as a stream for ttrpc.
pub fn host_connections(
    listener: VsockListener,
) -> impl Stream<Item = std::io::Result<VsockStream>> + Send + 'static {
    futures_util::stream::unfold(listener, |listener| async move {
        let next = accept_from_host(&listener).await.map(|(stream, _)| stream);
        Some((next, listener))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_admitted() {
        assert!(admits(2), "the host (hybrid vsock's peer)");
        // VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL (loopback), the guest's
        // own CIDs as the shim assigns them, VMADDR_CID_ANY.
        for cid in [0, 1, 3, 4, 1234, u32::MAX] {
            assert!(!admits(cid), "CID {cid} must be refused");
        }
    }
}
