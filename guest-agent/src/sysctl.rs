//! ApplySysctls: sysctls written in the agent's own namespaces, which are
//! the guest's network, IPC and UTS namespaces that every pod container
//! joins (the VM is the pod).
//!
//! Each name is checked by the protocol's rule (`clh_agent_protocol::sysctl`)
//! and opened beneath an fd of /proc/sys with `openat2`, refusing symlinks,
//! magic links and mount crossings, so no name can reach anything else.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use clh_agent_protocol::sysctl::{check_value, path_of, SysctlError};
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Where the agent's namespaces show their sysctls.
const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] SysctlError),
    #[error("cannot open {PROC_SYS}")]
    ProcSys(#[source] nix::Error),
    #[error("cannot set sysctl {name}={value:?}{hint}")]
    Write {
        name: String,
        value: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ApplyError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            ApplyError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            ApplyError::Write { source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::EINVAL | libc::ERANGE)
                ) =>
            {
                ttrpc::Code::INVALID_ARGUMENT
            }
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

/// Checks every sysctl first, then writes them in name order.
pub fn apply(sysctls: &std::collections::HashMap<String, String>) -> Result<(), ApplyError> {
    let sorted: BTreeMap<&String, &String> = sysctls.iter().collect();
    let mut paths = Vec::with_capacity(sorted.len());
    for (name, value) in &sorted {
        check_value(name, value)?;
        paths.push((path_of(name)?, *name, *value));
    }
    if paths.is_empty() {
        return Ok(());
    }
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root: OwnedFd = open(PROC_SYS, dir_flags, Mode::empty()).map_err(ApplyError::ProcSys)?;
    for (path, name, value) in paths {
        write_one(&root, &path, value).map_err(|source| ApplyError::Write {
            name: name.clone(),
            value: value.clone(),
            hint: hint(&source),
            source,
        })?;
        tracing::info!(name = %name, value = %value, "sysctl set");
    }
    Ok(())
}

/// Why a write may have failed, for the error message.
fn hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => " (the guest kernel has no such sysctl)",
        Some(libc::EINVAL | libc::ERANGE) => " (the guest kernel refused the value)",
        _ => "",
    }
}

fn write_one(root: &OwnedFd, path: &str, value: &str) -> std::io::Result<()> {
    let how = OpenHow::new()
        .flags(OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = openat2(root.as_fd(), path, how)?;
    // One write: /proc/sys takes a value in a single write(2).
    std::fs::File::from(fd).write_all(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_bad_name_is_refused_before_anything_is_written() {
        let sysctls: HashMap<String, String> = [
            ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
            ("kernel..x".to_string(), "1".to_string()),
        ]
        .into();
        let e = apply(&sysctls).unwrap_err();
        assert!(matches!(e, ApplyError::Invalid(_)), "{e}");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
    }

    #[test]
    fn nothing_to_apply_is_fine() {
        assert!(apply(&HashMap::new()).is_ok());
    }
}
