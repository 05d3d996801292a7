//! The Task service's errors, and the one place they become ttrpc codes:
//! the service's own refusals, the agent's answers (its code survives), a
//! pod VM that did not start (by the step that failed) and the pod cgroup.

use ttrpc::Code;

use clh_network::NetError;

use crate::pod_cgroup::CgroupError;
use crate::vm::{chain, StartStep, VmStartError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The guest (its VM or its agent) is gone or not reachable.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; the chain is printed with `{:#}`.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Unavailable(_) => Code::UNAVAILABLE,
            Error::Internal(_) => Code::INTERNAL,
        }
    }
}

/// An agent call that failed: the agent's own status code survives (it
/// maps its errors the same way), a missed deadline is DeadlineExceeded,
/// a lost connection Unavailable, a guest image from another build
/// FailedPrecondition.
impl From<clh_agent_client::Error> for Error {
    fn from(e: clh_agent_client::Error) -> Self {
        use clh_agent_client::Error as Agent;
        if let Agent::Rpc {
            method,
            source: ttrpc::Error::RpcStatus(status),
        } = &e
        {
            let msg = format!("agent {method}: {}", status.message());
            return match status.code() {
                Code::NOT_FOUND => Error::NotFound(msg),
                Code::ALREADY_EXISTS => Error::AlreadyExists(msg),
                Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                Code::UNIMPLEMENTED => Error::Unimplemented(msg),
                Code::DEADLINE_EXCEEDED => Error::DeadlineExceeded(msg),
                Code::UNAVAILABLE => Error::Unavailable(msg),
                _ => Error::Internal(anyhow::anyhow!(msg)),
            };
        }
        let msg = chain(&e);
        if let Agent::Deadline { method, .. } = e {
            // The agent undoes what these make for a caller that is gone.
            let undone = match method {
                "CreateContainer" | "StartProcess" => " The guest keeps nothing of it.",
                _ => "",
            };
            Error::DeadlineExceeded(format!(
                "{msg}.{undone} If the host is this busy, raise [timeouts] agent_call_ms \
                 in the shim's configuration ({})",
                clh_config::DEFAULT_PATH
            ))
        } else if e.is_timeout() {
            Error::DeadlineExceeded(msg)
        } else if e.is_disconnected() {
            Error::Unavailable(format!("{msg} (has the pod's VM stopped?)"))
        } else if matches!(e, Agent::ProtocolMismatch { .. }) {
            Error::FailedPrecondition(msg)
        } else {
            Error::Internal(anyhow::Error::new(e))
        }
    }
}

impl From<CgroupError> for Error {
    fn from(e: CgroupError) -> Self {
        match e {
            CgroupError::InvalidPath { .. } | CgroupError::SystemdNotRunning { .. } => {
                Error::InvalidArgument(e.to_string())
            }
            CgroupError::InUse { .. } => Error::AlreadyExists(e.to_string()),
            other => Error::Internal(anyhow::Error::new(other)),
        }
    }
}

/// A pod VM that did not start, by the step that failed; the message is
/// the whole chain and the logs' tails.
impl From<VmStartError> for Error {
    fn from(e: VmStartError) -> Self {
        let mut msg = e.message();
        if let Some(hint) = storage_hint(std::iter::successors(
            Some(&e.step as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )) {
            msg = format!("{msg}\n{hint}");
        }
        match e.step {
            StartStep::InvalidId { .. } => Error::InvalidArgument(msg),
            StartStep::MissingGuestFile { .. } | StartStep::RngNotReady { .. } => {
                Error::FailedPrecondition(msg)
            }
            StartStep::StateDir(_) => Error::InvalidArgument(msg),
            StartStep::Cgroup(cgroup) => match Error::from(cgroup) {
                Error::InvalidArgument(_) => Error::InvalidArgument(msg),
                Error::AlreadyExists(_) => Error::AlreadyExists(msg),
                _ => Error::Internal(anyhow::anyhow!(msg)),
            },
            StartStep::Virtiofsd(hv) | StartStep::Vmm(hv) => match hv {
                clh_hypervisor::Error::Spawn { .. } => Error::FailedPrecondition(msg),
                clh_hypervisor::Error::InvalidSpec(_) => Error::InvalidArgument(msg),
                clh_hypervisor::Error::Timeout { .. } => Error::DeadlineExceeded(msg),
                _ => Error::Internal(anyhow::anyhow!(msg)),
            },
            StartStep::VmmExited { .. } => Error::Unavailable(msg),
            StartStep::Network(net) => match net {
                NetError::OpenNetns { .. } | NetError::Tap { .. } => Error::FailedPrecondition(msg),
                NetError::NoMac { .. } => Error::InvalidArgument(msg),
                NetError::Timeout { .. } => Error::DeadlineExceeded(msg),
                _ => Error::Internal(anyhow::anyhow!(msg)),
            },
            StartStep::Agent(agent) | StartStep::GuestNetwork(agent) => match Error::from(agent) {
                Error::Internal(_) => Error::Internal(anyhow::anyhow!(msg)),
                Error::NotFound(_) => Error::NotFound(msg),
                Error::AlreadyExists(_) => Error::AlreadyExists(msg),
                Error::InvalidArgument(_) => Error::InvalidArgument(msg),
                Error::FailedPrecondition(_) => Error::FailedPrecondition(msg),
                Error::Unimplemented(_) => Error::Unimplemented(msg),
                Error::DeadlineExceeded(_) => Error::DeadlineExceeded(msg),
                Error::Unavailable(_) => Error::Unavailable(msg),
            },
            StartStep::Io { .. } | StartStep::SharedDir(_) | StartStep::Seed(_) => {
                Error::Internal(anyhow::anyhow!(msg))
            }
        }
    }
}

/// What to do when `chain` (an error and its causes) holds a full or
/// read-only file system (REL-DISK-01): the path is already in the
/// message; the fix depends on which file system it is on.
fn storage_hint<'a>(
    mut chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> Option<&'static str> {
    chain.find_map(
        |e| match e.downcast_ref::<std::io::Error>()?.raw_os_error()? {
            libc::ENOSPC | libc::EDQUOT => Some(
                "the file system holding that path is full (blocks or inodes): free space on it, \
             or move runtime.state_dir (the shim's state) or containerd's state to a larger one",
            ),
            libc::EROFS => Some(
                "the file system holding that path is read-only: remount it read-write, \
             or move runtime.state_dir (the shim's state) to a writable one",
            ),
            _ => None,
        },
    )
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let message = match &e {
            Error::Internal(inner) => match storage_hint(inner.chain()) {
                Some(hint) => format!("{inner:#}\n{hint}"),
                None => format!("{inner:#}"),
            },
            other => other.to_string(),
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn a_full_or_read_only_file_system_says_what_to_do() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = anyhow::Error::new(full).context("cannot create /run/clh-shim/x/rootfs");
        let (code, message) = status(Error::Internal(e));
        assert_eq!(code, Code::INTERNAL);
        assert!(
            message.starts_with("cannot create /run/clh-shim/x/rootfs: "),
            "{message}"
        );
        assert!(
            message.contains("is full (blocks or inodes): free space"),
            "{message}"
        );
        let ro = std::io::Error::from_raw_os_error(libc::EROFS);
        let (_, message) = status(Error::Internal(anyhow::Error::new(ro)));
        assert!(
            message.contains("read-only: remount it read-write"),
            "{message}"
        );
        let other = std::io::Error::from_raw_os_error(libc::EACCES);
        let (_, message) = status(Error::Internal(anyhow::Error::new(other)));
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn every_variant_keeps_its_code_and_message() {
        let cases = [
            (Error::NotFound("a".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("a".into()), Code::ALREADY_EXISTS),
            (Error::InvalidArgument("a".into()), Code::INVALID_ARGUMENT),
            (
                Error::FailedPrecondition("a".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented("a".into()), Code::UNIMPLEMENTED),
            (Error::DeadlineExceeded("a".into()), Code::DEADLINE_EXCEEDED),
        ];
        for (err, code) in cases {
            assert_eq!(status(err), (code, "a".to_string()));
        }
    }

    #[test]
    fn internal_errors_carry_their_whole_chain() {
        let e = anyhow::anyhow!("root cause").context("starting the VM");
        let (code, msg) = status(Error::Internal(e));
        assert_eq!(code, Code::INTERNAL);
        assert_eq!(msg, "starting the VM: root cause");
    }

    #[test]
    fn agent_status_codes_survive() {
        let e = clh_agent_client::Error::Rpc {
            method: "WaitProcess",
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "no such process")),
        };
        let (code, msg) = status(Error::from(e));
        assert_eq!(code, Code::NOT_FOUND);
        assert_eq!(msg, "agent WaitProcess: no such process");
    }

    #[test]
    fn a_late_or_lost_agent_is_deadline_exceeded_or_unavailable() {
        let rpc = |source| clh_agent_client::Error::Rpc {
            method: "StartProcess",
            source,
        };
        let late = rpc(ttrpc::Error::Others("Request deadline elapsed".into()));
        assert_eq!(status(late.into()).0, Code::DEADLINE_EXCEEDED);
        let (code, msg) = status(rpc(ttrpc::Error::RemoteClosed).into());
        assert_eq!(code, Code::UNAVAILABLE);
        assert!(msg.contains("agent call StartProcess failed"), "{msg}");
        let missed = clh_agent_client::Error::Deadline {
            method: "CreateContainer",
            timeout: std::time::Duration::from_secs(30),
            source: ttrpc::Error::Others("Request deadline elapsed".into()),
        };
        let (code, msg) = status(missed.into());
        assert_eq!(code, Code::DEADLINE_EXCEEDED);
        for what in [
            "CreateContainer within 30s",
            "agent_call_ms",
            "keeps nothing",
        ] {
            assert!(msg.contains(what), "{what:?} not in {msg}");
        }
        let mismatch = clh_agent_client::Error::ProtocolMismatch { shim: 3, agent: 2 };
        assert_eq!(status(mismatch.into()).0, Code::FAILED_PRECONDITION);
    }
}
