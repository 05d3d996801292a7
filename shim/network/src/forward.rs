//! Port forwarding into the VM (CRI PortForward): containerd dials
//! `localhost:<port>` inside the pod's network namespace, where nothing of
//! the guest listens. So the shim listens on 127.0.0.1 there, and one
//! iptables rule in that namespace redirects every other loopback TCP
//! connection to that listener; the shim learns the port the client asked
//! for (SO_ORIGINAL_DST) and carries the stream to the guest's agent,
//! which connects to that port on the guest's own loopback (so a server
//! bound to 127.0.0.1 in the guest is reached, as with runc).

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};

use crate::{netns, NetError};

/// Binds the interceptor's listener on 127.0.0.1 in `netns` (non-blocking,
/// for tokio) and adds the rule that redirects the namespace's other
/// loopback TCP connections to it. The rule goes with the namespace.
pub fn intercept_loopback(netns_path: &Path) -> Result<TcpListener, NetError> {
    let listener = netns::enter_and(netns_path, || {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })?
    .map_err(NetError::Forward)?;
    let port = listener.local_addr().map_err(NetError::Forward)?.port();
    let rule = [
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "!",
        "--dport",
        &port.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &port.to_string(),
    ];
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns_path.display()))
        .arg("iptables")
        .args(rule)
        .output()
        .map_err(|source| NetError::Iptables {
            detail: format!(
                "cannot run nsenter iptables: {source} (install iptables and util-linux)"
            ),
        })?;
    if !output.status.success() {
        return Err(NetError::Iptables {
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(listener)
}

/// The port a redirected connection was made to.
pub fn original_port(stream: &impl AsFd) -> Result<u16, NetError> {
    let dst = getsockopt(stream, OriginalDst).map_err(|e| NetError::Forward(e.into()))?;
    Ok(u16::from_be(dst.sin_port))
}
