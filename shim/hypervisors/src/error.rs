use std::path::PathBuf;
use std::time::Duration;

/// Errors of the hypervisor layer. Messages say what failed; the `source`
/// chain says why (it is never repeated in the message).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to start {binary}: is it installed and executable? (set its path in the [hypervisor] section of the configuration)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} exited early ({status}); last lines of its log:\n{log_tail}")]
    ExitedEarly {
        what: String,
        status: String,
        log_tail: String,
    },

    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    #[error("Cloud Hypervisor API {endpoint} failed with HTTP {status}: {body}")]
    Api {
        endpoint: &'static str,
        status: u16,
        body: String,
    },

    #[error("Cloud Hypervisor API {endpoint}: cannot talk to the API socket")]
    ApiTransport {
        endpoint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("Cloud Hypervisor API {endpoint}: cannot encode the request body (paths must be valid UTF-8)")]
    ApiEncode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("Cloud Hypervisor API {endpoint}: unexpected response body")]
    ApiDecode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{0} is not supported by this hypervisor backend")]
    Unsupported(&'static str),

    #[error("invalid VM specification: {0}")]
    InvalidSpec(String),

    /// The VMM must run in this network namespace (it opens the VM's taps
    /// there), and it cannot be entered: a missing file, or not a network
    /// namespace.
    #[error("cannot use the network namespace {path} for the VMM")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("QEMU machine protocol (QMP): {0}")]
    Qmp(String),

    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
