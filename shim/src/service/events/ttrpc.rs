//! The production [`Transport`]: containerd's ttrpc Events service at
//! `TTRPC_ADDRESS`, on a connection of our own that is replaced whenever
//! it fails (containerd-shim's `RemotePublisher` connects once and, after
//! a containerd restart, keeps failing on the dead connection).

use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::Client;
use containerd_shim_protos::ttrpc::Code;

use super::{ForwardError, Transport, FORWARD_TIMEOUT};

pub(crate) struct TtrpcEvents {
    /// A ttrpc address (`unix://...`).
    address: String,
    client: Option<EventsClient>,
}

impl TtrpcEvents {
    /// `address` as containerd passes it in `TTRPC_ADDRESS`: a socket
    /// path, or an address with its scheme.
    pub(crate) fn new(address: &str) -> Self {
        let address = if address.contains("://") {
            address.to_string()
        } else {
            format!("unix://{address}")
        };
        Self {
            address,
            client: None,
        }
    }
}

#[async_trait::async_trait]
impl Transport for TtrpcEvents {
    async fn connect(&mut self) -> Result<(), String> {
        self.client = None;
        let client = Client::connect(&self.address)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.address))?;
        self.client = Some(EventsClient::new(client));
        Ok(())
    }

    async fn forward(&mut self, envelope: &Envelope) -> Result<(), ForwardError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| ForwardError::Transport("not connected".into()))?;
        let mut req = ForwardRequest::new();
        req.set_envelope(envelope.clone());
        let ctx = ttrpc::context::with_duration(FORWARD_TIMEOUT);
        match client.forward(ctx, &req).await {
            Ok(_) => Ok(()),
            Err(ttrpc::Error::RpcStatus(s))
                if !matches!(s.code(), Code::DEADLINE_EXCEEDED | Code::UNAVAILABLE) =>
            {
                Err(ForwardError::Rejected(format!(
                    "{:?}: {}",
                    s.code(),
                    s.message()
                )))
            }
            // Every other error is the connection's: a closed socket shows
            // as "channel closed", "socket err", "remote stream closed"...
            Err(e) => Err(ForwardError::Transport(e.to_string())),
        }
    }
}
