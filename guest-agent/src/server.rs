//! Where and how the ttrpc service listens.

use crate::containers::Containers;
use crate::service::AgentService;
use crate::volumes::Volumes;
use std::sync::Arc;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::Server;

/// A listening address: vsock in the guest, a Unix socket in host test mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK, this port on any local CID; only the host may connect
    /// (see `vsock_peer`).
    Vsock(u32),
    /// A Unix socket at this path.
    Unix(String),
}

impl ListenAddr {
    /// Parses `unix:///path` or `vsock://<port>` (the latter for symmetry).
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(path) = s.strip_prefix("unix://") {
            return (!path.is_empty()).then(|| ListenAddr::Unix(path.to_owned()));
        }
        s.strip_prefix("vsock://")?
            .parse()
            .ok()
            .map(ListenAddr::Vsock)
    }

    fn ttrpc_addr(&self) -> String {
        match self {
            // -1 is ttrpc's spelling of VMADDR_CID_ANY.
            ListenAddr::Vsock(port) => format!("vsock://-1:{port}"),
            ListenAddr::Unix(path) => format!("unix://{path}"),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.ttrpc_addr())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve ttrpc on {addr}")]
pub struct ServeError {
    addr: ListenAddr,
    #[source]
    source: ttrpc::Error,
}

/// Binds `addr` and starts accepting in the background. The returned server
/// must be kept alive; dropping it stops the service.
pub async fn serve(
    addr: &ListenAddr,
    containers: Containers,
    volumes: Volumes,
) -> Result<Server, ServeError> {
    let err = |source| ServeError {
        addr: addr.clone(),
        source,
    };
    let services = clh_agent_protocol::create_agent(Arc::new(AgentService {
        containers,
        volumes,
    }));
    let server = match addr {
        // Our own accept loop, so that only the host gets through.
        ListenAddr::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                *port,
            ))
            .map_err(|e| err(ttrpc::Error::Others(format!("binding: {e}"))))?;
            Server::new().add_listener(Listener::new(crate::vsock_peer::host_connections(listener)))
        }
        ListenAddr::Unix(_) => Server::new().bind(&addr.ttrpc_addr()).map_err(err)?,
    };
    let mut server = server.register_service(services);
    server.start().await.map_err(err)?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///tmp/a.sock"),
            Some(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            ListenAddr::parse("vsock://1024"),
            Some(ListenAddr::Vsock(1024))
        );
        assert_eq!(ListenAddr::parse("unix://"), None);
        assert_eq!(ListenAddr::parse("/tmp/a.sock"), None);
        assert_eq!(ListenAddr::Vsock(1024).to_string(), "vsock://-1:1024");
    }
}
