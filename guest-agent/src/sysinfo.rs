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

/// Time since boot (CLOCK_BOOTTIME), in microseconds.
pub fn uptime_us() -> Result<u64, SysInfoError> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(SysInfoError::Clock)?;
    Ok(ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000)
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

/// `/proc/loadavg`'s 1, 5 and 15 minute load averages.
pub fn loadavg() -> Result<(f64, f64, f64), SysInfoError> {
    const PATH: &str = "/proc/loadavg";
    parse_loadavg(&read(PATH)?).ok_or(SysInfoError::Missing {
        path: PATH,
        field: "load averages",
    })
}

fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// The number of CPUs online (`/sys/devices/system/cpu/online`, a list of
/// ranges such as `0-3,5`).
pub fn cpus_online() -> Result<u32, SysInfoError> {
    const PATH: &str = "/sys/devices/system/cpu/online";
    count_cpu_list(&read(PATH)?).ok_or(SysInfoError::Missing {
        path: PATH,
        field: "CPU list",
    })
}

fn count_cpu_list(text: &str) -> Option<u32> {
    let mut n = 0u32;
    for range in text.trim().split(',').filter(|r| !r.is_empty()) {
        n += match range.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => range.parse::<u32>().map(|_| 1).ok()?,
        };
    }
    Some(n)
}

/// The aggregate `cpu` line of `/proc/stat` in milliseconds: user, nice,
/// system, idle, iowait, irq, softirq, steal. The kernel counts in
/// USER_HZ, which is 100 on Linux whatever CONFIG_HZ is.
pub fn cpu_times_ms() -> Result<[u64; 8], SysInfoError> {
    const PATH: &str = "/proc/stat";
    parse_cpu_times_ms(&read(PATH)?).ok_or(SysInfoError::Missing {
        path: PATH,
        field: "cpu",
    })
}

const USER_HZ: u64 = 100;

fn parse_cpu_times_ms(text: &str) -> Option<[u64; 8]> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let mut fields = line.split_whitespace().skip(1);
    let mut out = [0u64; 8];
    for slot in &mut out {
        // Older kernels have fewer columns: what is missing stays 0.
        let Some(ticks) = fields.next() else { break };
        *slot = ticks.parse::<u64>().ok()?.saturating_mul(1000 / USER_HZ);
    }
    Some(out)
}

/// One interface's counters from `/proc/net/dev`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetDev {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Every interface of `/proc/net/dev` but the loopback.
pub fn net_devs() -> Result<Vec<NetDev>, SysInfoError> {
    Ok(parse_net_dev(&read("/proc/net/dev")?))
}

fn parse_net_dev(text: &str) -> Vec<NetDev> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let c: Vec<u64> = counters
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            // rx: bytes packets errs drop fifo frame compressed multicast;
            // tx: bytes packets errs drop fifo colls carrier compressed.
            (c.len() >= 16).then(|| NetDev {
                name: name.to_owned(),
                rx_bytes: c[0],
                rx_packets: c[1],
                rx_errors: c[2],
                rx_dropped: c[3],
                tx_bytes: c[8],
                tx_packets: c[9],
                tx_errors: c[10],
                tx_dropped: c[11],
            })
        })
        .collect()
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
    fn parses_load_cpus_and_cpu_times() {
        assert_eq!(
            parse_loadavg("0.50 0.25 1.00 1/80 123\n"),
            Some((0.5, 0.25, 1.0))
        );
        assert_eq!(parse_loadavg("garbage"), None);
        assert_eq!(count_cpu_list("0-3,5\n"), Some(5));
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
        let stat = "cpu  10 1 20 300 4 0 2 0 0 0\ncpu0 10 1 20 300 4 0 2 0 0 0\n";
        assert_eq!(
            parse_cpu_times_ms(stat),
            Some([100, 10, 200, 3000, 40, 0, 20, 0])
        );
        assert_eq!(parse_cpu_times_ms("intr 1\n"), None);
    }

    #[test]
    fn parses_net_dev_without_the_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0:    1500      10    1    2    0     0          0         0      900       7    3    4    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            vec![NetDev {
                name: "eth0".into(),
                rx_bytes: 1500,
                rx_packets: 10,
                rx_errors: 1,
                rx_dropped: 2,
                tx_bytes: 900,
                tx_packets: 7,
                tx_errors: 3,
                tx_dropped: 4,
            }]
        );
    }

    #[test]
    fn reads_this_host() {
        let (l1, _, _) = loadavg().unwrap();
        assert!(l1 >= 0.0);
        assert!(cpus_online().unwrap() >= 1);
        assert!(cpu_times_ms().unwrap()[3] > 0);
        net_devs().unwrap();
        assert!(!kernel_release().unwrap().is_empty());
        assert_eq!(boot_id().unwrap().len(), 36);
        assert!(uptime_ms().unwrap() > 0);
        assert!(self_rss_kib().unwrap() > 0);
        let (total, avail) = meminfo_kib().unwrap();
        assert!(total >= avail && avail > 0);
    }
}
