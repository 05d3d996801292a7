//! The one rule for sysctl names and values, on both sides: the shim
//! refuses a bad one before the VM boots, the agent again before it opens
//! anything under /proc/sys.
//!
//! A name is what the OCI spec and the CRI carry: dot-separated components
//! (`kernel.shm_rmid_forced`) of `[a-z0-9_-]`, where a `/` inside a
//! component stands for a literal dot (the kubelet's form for an interface
//! such as `eth0.100`: `net.ipv4.conf.eth0/100.forwarding`). No component
//! is empty or, once mapped, starts with `.`, so a name can only ever name
//! a file below /proc/sys, never `..`.

/// Longest name, in bytes (far beyond any sysctl the kernel has).
pub const MAX_NAME_LEN: usize = 256;
/// Longest value, in bytes: a sysctl write takes at most a page.
pub const MAX_VALUE_LEN: usize = 4096;

/// Why a sysctl was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl name {name:?} is not valid: {why}; a name is dot-separated components of [a-z0-9_-] (a '/' inside a component stands for a dot), at most {MAX_NAME_LEN} bytes")]
    Name { name: String, why: &'static str },
    #[error("the value of sysctl {name} is not valid: {why}")]
    Value { name: String, why: &'static str },
}

/// Checks `name` and returns its path below /proc/sys
/// (`kernel.shm_rmid_forced` → `kernel/shm_rmid_forced`).
pub fn path_of(name: &str) -> Result<String, SysctlError> {
    let bad = |why| SysctlError::Name {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is too long"));
    }
    let mut parts = Vec::new();
    for component in name.split('.') {
        if component.is_empty() {
            return Err(bad("it has an empty component"));
        }
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-/".contains(c);
        if !component.chars().all(ok) {
            return Err(bad("it has a character outside [a-z0-9_-/.]"));
        }
        let mapped = component.replace('/', ".");
        if mapped.starts_with('.') {
            return Err(bad("a component starts with '/'"));
        }
        parts.push(mapped);
    }
    Ok(parts.join("/"))
}

/// Checks a sysctl's value: at most [`MAX_VALUE_LEN`] bytes, no NUL.
pub fn check_value(name: &str, value: &str) -> Result<(), SysctlError> {
    let bad = |why| SysctlError::Value {
        name: name.to_owned(),
        why,
    };
    if value.len() > MAX_VALUE_LEN {
        return Err(bad("it is longer than 4096 bytes"));
    }
    if value.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_paths_below_proc_sys() {
        for (name, path) in [
            ("kernel.shm_rmid_forced", "kernel/shm_rmid_forced"),
            (
                "net.ipv4.ip_unprivileged_port_start",
                "net/ipv4/ip_unprivileged_port_start",
            ),
            ("fs.mqueue.msg_max", "fs/mqueue/msg_max"),
            (
                "net.ipv4.conf.eth0/100.forwarding",
                "net/ipv4/conf/eth0.100/forwarding",
            ),
            (
                "net.ipv6.conf.all.disable_ipv6",
                "net/ipv6/conf/all/disable_ipv6",
            ),
        ] {
            assert_eq!(path_of(name).unwrap(), path, "{name}");
        }
    }

    #[test]
    fn names_that_could_leave_proc_sys_are_refused() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "kernel..x",
            ".kernel",
            "kernel.",
            "kernel/../../etc",
            "net.ipv4.conf.//.x",
            "net.ipv4.conf./.x",
            "net.ipv4.conf./x.y",
            "Kernel.Panic",
            "kernel.shm rmid",
            "kernel.x\0",
            "kernel.x\n",
            &long,
        ] {
            assert!(
                matches!(path_of(bad), Err(SysctlError::Name { .. })),
                "{bad:?} accepted"
            );
        }
        // '/' inside a name can only stand for a dot in one component.
        let e = path_of("kernel/../../etc").unwrap_err();
        assert!(e.to_string().contains("kernel/../../etc"), "{e}");
    }

    #[test]
    fn values_are_bounded() {
        assert!(check_value("net.ipv4.ping_group_range", "0 2147483647").is_ok());
        assert!(check_value("kernel.x", "a\0b").is_err());
        assert!(check_value("kernel.x", &"1".repeat(MAX_VALUE_LEN + 1)).is_err());
    }
}
