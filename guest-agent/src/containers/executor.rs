//! The last step before a container process's execve, for inits and execs
//! alike: signal dispositions as a process started by runc has them, then
//! the container's seccomp filter for an exec (see `exec_seccomp`).
//!
//! The agent is a Rust program, whose runtime ignores SIGPIPE, and an
//! ignored signal stays ignored across execve. So every container process
//! started with SIGPIPE ignored: `yes | head` printed "Broken pipe", and a
//! writer whose reader had gone kept running until a write failed, where
//! under runc it dies of SIGPIPE at once.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{signal, SigHandler, Signal};
use oci_spec::runtime::Spec;

use super::exec_seccomp::FilteredExec;

/// Runs a container's process: default SIGPIPE, then `seccomp` (an exec's
/// filter) or libcontainer's own executor.
#[derive(Clone)]
pub(super) struct ContainerExec {
    pub seccomp: Option<FilteredExec>,
}

impl Executor for ContainerExec {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run
        // in signal context; this process is about to execve.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }
            .map_err(|e| ExecutorError::Other(format!("restoring SIGPIPE's default: {e}")))?;
        match &self.seccomp {
            Some(filtered) => filtered.exec(spec),
            None => DefaultExecutor {}.exec(spec),
        }
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
