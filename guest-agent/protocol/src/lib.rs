//! The shim ⇄ guest-agent protocol: `proto/agent.proto`, compiled at build time.
//!
//! Both sides depend on this crate, so they can never disagree on the wire
//! format; [`PROTOCOL_VERSION`] guards against a shim and an agent built from
//! different revisions of it.

/// Protocol messages (generated).
#[allow(clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
#[allow(dead_code, missing_docs, non_camel_case_types, non_snake_case, non_upper_case_globals, unused_imports, unused_mut, unused_results, trivial_casts)]
#[rustfmt::skip]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Async ttrpc client and server stubs (generated).
#[allow(clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
#[allow(dead_code, missing_docs, non_camel_case_types, non_snake_case, non_upper_case_globals, unused_imports, unused_mut, unused_results, trivial_casts)]
#[rustfmt::skip]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The protocol version both sides must agree on. Bump on incompatible change.
///
/// 2: SyncVolume/RemoveVolume. Additive on the wire, but a shim of version
/// 2 needs them for nearly every pod (the service-account token is a
/// projected volume), so an older agent is refused at connect with a clear
/// message rather than failing each pod at its first volume.
///
/// 3: SeedRandom; the RNG seed left the kernel command line, so an agent
/// of version 2 would run unseeded by the host.
///
/// 4: ConfigureNetwork; a pod with interfaces needs it before its first
/// container, so an agent of version 3 would leave the pod unreachable.
///
/// 5: ApplySysctls; a pod's sysctls must hold before its first container,
/// so an agent of version 4 would run the pod without them.
///
/// 6: SetIdentity; the hostname left the kernel command line (so that
/// pods of every name share one template), so an agent of version 5 would
/// run a pod under the default name.
pub const PROTOCOL_VERSION: u32 = 6;

/// The AF_VSOCK port the agent serves ttrpc on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The AF_VSOCK port for stdio streams (see the comment in agent.proto).
pub const STDIO_VSOCK_PORT: u32 = 1025;

/// The AF_VSOCK port for port-forward streams (see agent.proto).
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// The virtio-fs tag of the per-VM shared directory.
pub const SHARED_FS_TAG: &str = "clh-shared";

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/clh/shared";

/// Where the guest keeps a pod's memory-backed volumes (`emptyDir` with
/// `medium: Memory`): directories in the guest's RAM, shared by the pod's
/// containers. A bind mount whose source is `<EPHEMERAL_DIR>/<name>` makes
/// the agent create `<name>` (one plain component) before the container.
pub const EPHEMERAL_DIR: &str = "/run/clh/ephemeral";

/// Where the agent keeps the copies of synced volumes (SyncVolume):
/// `<GUEST_VOLUMES_DIR>/<container_id>/<volume>`.
pub const GUEST_VOLUMES_DIR: &str = "/run/clh/volumes";

mod hostname;
mod id;
pub mod sysctl;

pub use agent::*;
pub use agent_ttrpc::{create_agent, Agent, AgentClient};
pub use hostname::{is_valid_hostname, HOSTNAME_RULE, MAX_HOSTNAME};
pub use id::{check_id, IdError, ID_RULE, MAX_ID_LEN};
