//! Guest facts for the Check RPC, read from the kernel on every call (they
//! are cheap, and Check is the shim's liveness probe, so stale caches would
//! defeat its purpose).

use nix::time::{clock_gettime, ClockId};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} line")]
    Missing {
        path: &'static str,
        field: &'static str,
    },
    #[error("clock_gettime(CLOCK_BOOTTIME) failed")]
    Clock(#[source] nix::errno::Errno),
    #[error("uname failed")]
    Uname(#[source] nix::errno::Errno),
}

pub fn kernel_release() -> Result<String, SysInfoError> {
    let uts = nix::sys::utsname::uname().map_err(SysInfoError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

pub fn boot_id() -> Result<String, SysInfoError> {
    Ok(read("/proc/sys/kernel/random/boot_id")?.trim().to_owned())
}

/// Time since boot, including suspended time, in milliseconds.
pub fn uptime_ms() -> Result<u64, SysInfoError> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(SysInfoError::Clock)?;
    let ms = ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000;
    Ok(ms)
}

/// Our resident set size (VmRSS), in KiB.
pub fn self_rss_kib() -> Result<u64, SysInfoError> {
    const PATH: &str = "/proc/self/status";
    kib_field(&read(PATH)?, "VmRSS:").ok_or(SysInfoError::Missing {
        path: PATH,
        field: "VmRSS",
    })
}

/// `(MemTotal, MemAvailable)` in KiB.
pub fn meminfo_kib() -> Result<(u64, u64), SysInfoError> {
    const PATH: &str = "/proc/meminfo";
    let text = read(PATH)?;
    let field = |field: &'static str| {
        kib_field(&text, &format!("{field}:")).ok_or(SysInfoError::Missing { path: PATH, field })
    };
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

fn read(path: &'static str) -> Result<String, SysInfoError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| SysInfoError::Read { path, source })
}

/// Finds `<label>   1234 kB` in /proc-style text and returns 1234.
fn kib_field(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_fields() {
        let text = "MemTotal:        505124 kB\nMemFree: 1 kB\nMemAvailable:    470000 kB\n";
        assert_eq!(kib_field(text, "MemTotal:"), Some(505124));
        assert_eq!(kib_field(text, "MemAvailable:"), Some(470000));
        assert_eq!(kib_field(text, "VmRSS:"), None);
    }

    #[test]
    fn reads_this_host() {
        assert!(!kernel_release().unwrap().is_empty());
        assert_eq!(boot_id().unwrap().len(), 36);
        assert!(uptime_ms().unwrap() > 0);
        assert!(self_rss_kib().unwrap() > 0);
        let (total, avail) = meminfo_kib().unwrap();
        assert!(total >= avail && avail > 0);
    }
}
