//! The container's seccomp filter in its exec'd processes.
//!
//! libcontainer 0.7 loads the spec's `linux.seccomp` into a container's
//! init only: its tenant builder (exec) rebuilds `linux` from the
//! namespaces, cgroup path, personality and time offsets, so every exec ran
//! unfiltered (`Seccomp: 0` under `kubectl exec`, where runc gives 2). runc
//! loads the container's filter into each exec, and so do we: in the last
//! step before execve (`super::executor`, a libcontainer `Executor`).
//!
//! Loading a filter needs no_new_privs or CAP_SYS_ADMIN, and by that step
//! libcontainer has dropped the process to its own capabilities. Without
//! no_new_privs runc loads the filter first and drops capabilities after;
//! we do the same: the process spec libcontainer gets carries CAP_SYS_ADMIN
//! and CAP_SETPCAP beside the process's own (only this module's code runs
//! with them, between libcontainer's setup and execve), and the executor
//! drops to the process's own capabilities once the filter is in. With
//! no_new_privs the filter goes in after the drop, as with runc.

use super::{CtrError, Result};
use libcontainer::capabilities::drop_privileges;
use libcontainer::seccomp::{initialize_seccomp, is_notify};
use libcontainer::syscall::syscall::create_syscall;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError};
use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec};

/// What loading a filter and then dropping the bounding set take.
const LOADING_CAPS: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Runs an exec'd process under its container's seccomp filter.
#[derive(Clone)]
pub(super) struct FilteredExec {
    filter: LinuxSeccomp,
    /// The process's own capabilities, to drop to once the filter is in;
    /// `None` when libcontainer already set them (no_new_privs, or a
    /// process spec without capabilities).
    drop_to: Option<LinuxCapabilities>,
}

/// Prepares `process`, an exec of a container whose spec has `filter`: its
/// capabilities get what loading the filter takes (see the module doc).
pub(super) fn prepare(process: &mut Process, filter: &LinuxSeccomp) -> Result<FilteredExec> {
    if is_notify(filter) {
        return Err(CtrError::InvalidArgument(
            "the container's seccomp profile uses SCMP_ACT_NOTIFY, which exec'd processes \
             do not support: use a profile without notify actions"
                .into(),
        ));
    }
    let no_new_privs = process.no_new_privileges() == Some(true);
    let drop_to = match process.capabilities() {
        Some(own) if !no_new_privs => {
            let own = own.clone();
            process.set_capabilities(Some(with_loading_caps(&own)));
            Some(own)
        }
        _ => None,
    };
    Ok(FilteredExec {
        filter: filter.clone(),
        drop_to,
    })
}

/// `caps` with [`LOADING_CAPS`] added to the bounding, permitted and
/// effective sets (inheritable and ambient stay as they are).
fn with_loading_caps(caps: &LinuxCapabilities) -> LinuxCapabilities {
    let widen = |set: &Option<_>| {
        let mut set: std::collections::HashSet<Capability> = set.clone().unwrap_or_default();
        set.extend(LOADING_CAPS);
        Some(set)
    };
    let mut wide = caps.clone();
    wide.set_bounding(widen(caps.bounding()))
        .set_permitted(widen(caps.permitted()))
        .set_effective(widen(caps.effective()));
    wide
}

impl FilteredExec {
    /// Loads the filter, drops to the process's own capabilities, then
    /// execs as libcontainer does: the last step of [`super::executor`].
    pub(super) fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        initialize_seccomp(&self.filter).map_err(|e| {
            ExecutorError::Other(format!("loading the container's seccomp filter: {e}"))
        })?;
        if let Some(own) = &self.drop_to {
            drop_privileges(own, &*create_syscall()).map_err(|e| {
                ExecutorError::Other(format!(
                    "dropping to the process's capabilities after loading seccomp: {e}"
                ))
            })?;
        }
        DefaultExecutor {}.exec(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn filter(action: &str) -> LinuxSeccomp {
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": action}]
        }))
        .unwrap()
    }

    fn process(caps: Option<&[&str]>, no_new_privs: bool) -> Process {
        let mut p = serde_json::json!({"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}});
        if let Some(caps) = caps {
            p["capabilities"] = serde_json::json!({
                "bounding": caps, "permitted": caps, "effective": caps
            });
        }
        if no_new_privs {
            p["noNewPrivileges"] = true.into();
        }
        serde_json::from_value(p).unwrap()
    }

    fn set(caps: &[Capability]) -> Option<HashSet<Capability>> {
        Some(caps.iter().copied().collect())
    }

    #[test]
    fn without_no_new_privs_the_filter_loads_with_sys_admin_then_drops() {
        let mut p = process(Some(&["CAP_CHOWN"]), false);
        let own = p.capabilities().clone();
        let exec = prepare(&mut p, &filter("SCMP_ACT_ERRNO")).unwrap();
        assert_eq!(exec.drop_to, own, "drops back to the process's own");
        let wide = p.capabilities().clone().unwrap();
        let expect = set(&[Capability::Chown, Capability::SysAdmin, Capability::Setpcap]);
        assert_eq!(wide.bounding(), &expect);
        assert_eq!(wide.permitted(), &expect);
        assert_eq!(wide.effective(), &expect);
        assert_eq!(wide.inheritable(), own.unwrap().inheritable());
    }

    #[test]
    fn with_no_new_privs_the_process_keeps_its_capabilities() {
        let mut p = process(Some(&["CAP_CHOWN"]), true);
        let own = p.capabilities().clone();
        let exec = prepare(&mut p, &filter("SCMP_ACT_ERRNO")).unwrap();
        assert!(exec.drop_to.is_none());
        assert_eq!(p.capabilities(), &own);
    }

    #[test]
    fn a_process_without_capabilities_is_left_alone() {
        let mut p = process(None, false);
        let exec = prepare(&mut p, &filter("SCMP_ACT_KILL")).unwrap();
        assert!(exec.drop_to.is_none());
        assert!(p.capabilities().is_none());
    }

    #[test]
    fn notify_profiles_are_refused() {
        let mut p = process(Some(&["CAP_CHOWN"]), false);
        let e = prepare(&mut p, &filter("SCMP_ACT_NOTIFY")).err().unwrap();
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}
