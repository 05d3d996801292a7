//! Why a pod VM did not start: one variant per step of
//! [`super::PodVm::start`], each saying what failed and, where the user can
//! act, what to do. service/error.rs gives each its ttrpc code.

use std::path::PathBuf;

use crate::pod_cgroup::CgroupError;

/// A failed start: the VM, the step that failed and the tails of the VM's
/// logs (guest console, VMM, virtiofsd), read before its directory went.
///
/// Its message is whole on its own (`failed to start VM <id>: <step>:
/// <causes>`, then the logs), whether printed with `{}` or through anyhow:
/// so it has no `source`, and the step stays a field for the code mapping
/// (service/error.rs).
#[derive(Debug)]
pub struct VmStartError {
    pub id: String,
    pub step: StartStep,
    /// Empty when no log had anything to say.
    pub report: String,
}

impl VmStartError {
    /// The whole message: the VM, the step, each cause in turn, the logs.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for VmStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let step = chain(&self.step);
        write!(f, "failed to start VM {}: {step}{}", self.id, self.report)
    }
}

/// `e` and each of its causes, joined with ": " (as anyhow's `{:#}`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

impl std::error::Error for VmStartError {}

#[derive(Debug, thiserror::Error)]
pub enum StartStep {
    #[error("invalid sandbox id {id:?}")]
    InvalidId {
        id: String,
        #[source]
        source: clh_agent_protocol::IdError,
    },

    #[error("the guest {what} {path} does not exist: build the guest image (make guest-image) or set guest.{key} in the configuration")]
    MissingGuestFile {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },

    #[error("the VM state directory cannot hold its sockets")]
    StateDir(#[source] clh_hypervisor::Error),

    #[error("cannot place the VM in its pod cgroup")]
    Cgroup(#[source] CgroupError),

    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot make the VM's shared directory")]
    SharedDir(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("cannot wire the pod's network namespace into the VM")]
    Network(#[source] clh_network::NetError),

    #[error("the guest agent could not configure the pod's network")]
    GuestNetwork(#[source] clh_agent_client::Error),

    #[error("virtiofsd did not start")]
    Virtiofsd(#[source] clh_hypervisor::Error),

    #[error("the VMM did not start")]
    Vmm(#[source] clh_hypervisor::Error),

    #[error("the VMM exited before the agent answered ({how})")]
    VmmExited { how: String },

    #[error("the guest agent did not answer")]
    Agent(#[source] clh_agent_client::Error),

    #[error("the guest's RNG is not initialised after crediting {credited} bytes of host entropy (entropy_avail {entropy_avail}); its kernel must support RNDADDENTROPY")]
    RngNotReady { credited: u32, entropy_avail: u32 },

    #[error("cannot read /dev/urandom for the guest RNG seed")]
    Seed(#[source] std::io::Error),
}
