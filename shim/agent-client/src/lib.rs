//! The shim's client of the guest agent: the hybrid-vsock handshake, the
//! protocol-version check, and a deadline on every call.

mod calls;
mod header_stream;
#[cfg(test)]
mod hostile_tests;
mod hybrid_vsock;
#[cfg(test)]
mod linger_tests;
pub mod metrics;
mod stdio;
#[cfg(test)]
mod stdio_tests;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use clh_agent_protocol::{
    CheckRequest, CheckResponse, IdentityRequest, SeedRandomRequest, SeedRandomResponse,
    VersionRequest, VersionResponse, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};
use tokio::time::Instant;
use ttrpc::r#async::transport::Socket;

pub use clh_agent_protocol::{ContainerStatsResponse, Stdio, WaitProcessResponse};
#[doc(hidden)]
pub use hybrid_vsock::{check_reply, read_reply_line};
pub use hybrid_vsock::{connect_hybrid_vsock, HandshakeError, MAX_REPLY_LINE};
pub use stdio::{
    open_forward_stream, open_stdio_stream, open_stdio_stream_on, StdioKind, FORWARD_OPEN_TIMEOUT,
    STDIO_OPEN_TIMEOUT,
};

/// Deadline of the first handshake attempt while the guest boots. Long
/// enough for a slow TCG guest to answer, short enough that a connection
/// the host side holds open while nothing in the guest listens yet is
/// retried soon. Each attempt that times out doubles it (up to
/// [`MAX_ATTEMPT_TIMEOUT`]): on a host so loaded that the guest takes
/// longer than that to answer, fixed short attempts would each be given up
/// just before their answer arrived, for ever (seen with five TCG VMs
/// booting at once on two cores). A given-up attempt's connection is not
/// closed while its `CONNECT` is unanswered ([`hybrid_vsock::LINGER`]): a
/// late answer written to a closed socket wedges vhost-device-vsock.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(16);

/// Pause between attempts: first, and most, after the previous one.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The next attempt's deadline: doubled after an attempt that timed out
/// (the guest may just be slow), unchanged after one the peer refused.
fn next_attempt_timeout(current: Duration, failure: &HandshakeError) -> Duration {
    match failure {
        HandshakeError::Timeout { .. } => (current * 2).min(MAX_ATTEMPT_TIMEOUT),
        _ => current,
    }
}

/// Deadline of each RPC unless the caller gives one.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the guest agent did not answer on vsock port {port} within {timeout:?} ({attempts} attempts; the guest console log usually says why)")]
    Unreachable {
        port: u32,
        timeout: Duration,
        attempts: u32,
        #[source]
        last: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("cannot reach the guest agent")]
    Handshake(#[source] HandshakeError),

    #[error("the guest agent speaks protocol version {agent} but this shim speaks {shim}: the guest image and the shim come from different builds (rebuild the guest image)")]
    ProtocolMismatch { shim: u32, agent: u32 },

    #[error("the guest agent did not answer {method} within {timeout:?} (a guest starved of CPU, or a stuck agent)")]
    Deadline {
        method: &'static str,
        timeout: Duration,
        #[source]
        source: ttrpc::Error,
    },

    #[error("agent call {method} failed")]
    Rpc {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },

    #[error("cannot attach {stream}: {reason}")]
    Stdio { stream: String, reason: String },

    #[error("cannot forward to port {port} in the guest: {reason}")]
    Forward { port: u16, reason: String },
}

impl Error {
    /// The ttrpc status code the agent answered with (NOT_FOUND,
    /// ALREADY_EXISTS, INVALID_ARGUMENT, FAILED_PRECONDITION, ...), if the
    /// call was answered at all.
    pub fn rpc_code(&self) -> Option<ttrpc::Code> {
        match self {
            Self::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the agent did not answer in time: it never answered the
    /// handshake, or a call passed its deadline.
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Deadline { .. } => true,
            Self::Rpc { source, .. } => missed_deadline(source),
            _ => false,
        }
    }

    /// Whether the connection to the agent is gone (the VM stopped, or
    /// the agent closed it).
    pub fn is_disconnected(&self) -> bool {
        match self {
            Self::Handshake(_) => true,
            Self::Rpc { source, .. } => matches!(
                source,
                ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed | ttrpc::Error::Socket(_)
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether a call failed for its deadline: the agent's server gave up on
/// it, or the client did.
fn missed_deadline(e: &ttrpc::Error) -> bool {
    match e {
        ttrpc::Error::RpcStatus(status) => status.code() == ttrpc::Code::DEADLINE_EXCEEDED,
        // ttrpc's client-side deadline ("Request deadline elapsed").
        ttrpc::Error::Others(message) => message.contains("deadline"),
        _ => false,
    }
}

/// A connected, version-checked agent client. Cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    inner: clh_agent_protocol::AgentClient,
    call_timeout: Duration,
    agent_version: String,
}

impl AgentClient {
    /// Connects to the agent through the hybrid-vsock socket `uds`, retrying
    /// while the guest boots, and checks the protocol version. Gives up
    /// once `timeout` has passed.
    pub async fn connect(uds: &Path, timeout: Duration) -> Result<Self> {
        Self::connect_to_port(uds, AGENT_VSOCK_PORT, timeout).await
    }

    /// [`AgentClient::connect`] on another port (tests).
    pub async fn connect_to_port(uds: &Path, port: u32, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt_timeout = ATTEMPT_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let last: Box<dyn std::error::Error + Send + Sync> =
                match Self::try_once(uds, port, left.min(attempt_timeout)).await {
                    Ok(client) => return Ok(client),
                    Err(Error::Handshake(e)) if e.is_retryable() => {
                        attempt_timeout = next_attempt_timeout(attempt_timeout, &e);
                        Box::new(e)
                    }
                    // The stream broke before Version was answered: the agent
                    // may not be fully up; retry. An answered call that fails
                    // is final.
                    Err(Error::Rpc { source, .. })
                        if !matches!(source, ttrpc::Error::RpcStatus(_)) =>
                    {
                        Box::new(source)
                    }
                    Err(Error::Deadline { source, .. }) => Box::new(source),
                    Err(e) => return Err(e),
                };
            if Instant::now() + backoff >= deadline {
                return Err(Error::Unreachable {
                    port,
                    timeout,
                    attempts,
                    last,
                });
            }
            tracing::debug!(attempts, error = %last, "agent not reachable yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn try_once(uds: &Path, port: u32, timeout: Duration) -> Result<Self> {
        let stream = connect_hybrid_vsock(uds, port, timeout)
            .await
            .map_err(Error::Handshake)?;
        let client = ttrpc::r#async::Client::new(Socket::from(stream));
        let mut this = Self {
            inner: clh_agent_protocol::AgentClient::new(client),
            call_timeout: timeout.max(Duration::from_millis(100)),
            agent_version: String::new(),
        };
        let reply = this.version().await?;
        if reply.protocol_version != PROTOCOL_VERSION {
            return Err(Error::ProtocolMismatch {
                shim: PROTOCOL_VERSION,
                agent: reply.protocol_version,
            });
        }
        this.agent_version = reply.agent_version;
        this.call_timeout = DEFAULT_CALL_TIMEOUT;
        Ok(this)
    }

    /// A client on a connection made elsewhere, whose version is not
    /// checked: for tests that serve a fake agent on a plain Unix socket.
    #[doc(hidden)]
    pub fn from_unchecked(inner: clh_agent_protocol::AgentClient) -> Self {
        Self {
            inner,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            agent_version: String::new(),
        }
    }

    /// The agent's version string, as reported at connect.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Sets the deadline of each later call.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.call_timeout)
    }

    /// The error of a failed call of `method`: a missed deadline (ours, or
    /// the agent's server's, which has the same one) says which it was.
    pub(crate) fn failed(&self, method: &'static str) -> impl FnOnce(ttrpc::Error) -> Error {
        let timeout = self.call_timeout;
        move |source| match missed_deadline(&source) {
            true => Error::Deadline {
                method,
                timeout,
                source,
            },
            false => Error::Rpc { method, source },
        }
    }

    pub async fn version(&self) -> Result<VersionResponse> {
        let req = VersionRequest {
            protocol_version: PROTOCOL_VERSION,
            shim_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        crate::metrics::timed("Version", self.inner.version(self.ctx(), &req))
            .await
            .map_err(self.failed("Version"))
    }

    /// Credits `seed` to the guest's RNG; the reply says whether the
    /// guest's CRNG is initialised now.
    pub async fn seed_random(&self, seed: &[u8]) -> Result<SeedRandomResponse> {
        let req = SeedRandomRequest {
            seed: seed.to_vec(),
            ..Default::default()
        };
        crate::metrics::timed("SeedRandom", self.inner.seed_random(self.ctx(), &req))
            .await
            .map_err(self.failed("SeedRandom"))
    }

    /// Sets the guest's wall clock to the host's now and, when given, its
    /// hostname.
    pub async fn set_identity(&self, hostname: Option<&str>) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let req = IdentityRequest {
            hostname: hostname.unwrap_or_default().to_string(),
            realtime_unix_ns: i64::try_from(now.as_nanos()).unwrap_or(i64::MAX),
            ..Default::default()
        };
        crate::metrics::timed("SetIdentity", self.inner.set_identity(self.ctx(), &req))
            .await
            .map(|_| ())
            .map_err(self.failed("SetIdentity"))
    }

    pub async fn check(&self) -> Result<CheckResponse> {
        crate::metrics::timed(
            "Check",
            self.inner.check(self.ctx(), &CheckRequest::default()),
        )
        .await
        .map_err(self.failed("Check"))
    }

    /// The test-only fault switch (REL-AGENT-01, REL-PANIC-01): only the
    /// test guest image's agent acts on it; the shim never calls it.
    /// `delay_ms`: SLOW_CREATE's delay.
    #[doc(hidden)]
    pub async fn inject_fault(
        &self,
        fault: clh_agent_protocol::fault_request::Fault,
        delay_ms: u32,
    ) -> Result<()> {
        let req = clh_agent_protocol::FaultRequest {
            fault: fault.into(),
            delay_ms,
            ..Default::default()
        };
        crate::metrics::timed("InjectFault", self.inner.inject_fault(self.ctx(), &req))
            .await
            .map(drop)
            .map_err(self.failed("InjectFault"))
    }
}
