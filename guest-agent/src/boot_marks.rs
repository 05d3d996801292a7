//! When the guest reached each step of its boot, in microseconds of
//! CLOCK_BOOTTIME (the kernel's clock since it started), for the boot
//! benchmark's phase breakdown (issue 14): the kernel's own steps from its
//! log (`/dev/kmsg`, read once, at the first Check), the agent's from its
//! own marks. Best effort: a mark that cannot be had is left out.

use std::sync::Mutex;

use clh_agent_protocol::agent::BootMark;

/// The agent's own marks, in order.
static AGENT: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());
/// The kernel's, read from its log on first need.
static KERNEL: Mutex<Option<Vec<(&'static str, u64)>>> = Mutex::new(None);

/// Kernel log lines that start a boot step, and the step's name.
const KERNEL_STEPS: &[(&str, &str)] = &[
    (
        "Trying to unpack rootfs image as initramfs",
        "initramfs_unpack_start",
    ),
    ("Unpacking initramfs", "initramfs_unpack_start"),
    ("Freeing initrd memory", "initramfs_unpack_done"),
    ("Run /init as init process", "run_init"),
];

/// Records that the agent reached `step` now.
pub fn mark(step: &'static str) {
    if let Ok(now) = crate::sysinfo::uptime_us() {
        if let Ok(mut marks) = AGENT.lock() {
            marks.push((step, now));
        }
    }
}

/// Every mark so far: the kernel's, then the agent's.
pub fn all() -> Vec<BootMark> {
    let kernel = {
        let mut k = KERNEL.lock().unwrap_or_else(|p| p.into_inner());
        k.get_or_insert_with(read_kernel_log).clone()
    };
    let agent = AGENT.lock().map(|m| m.clone()).unwrap_or_default();
    kernel
        .into_iter()
        .chain(agent)
        .map(|(name, at_us)| BootMark {
            name: name.to_owned(),
            at_us,
            ..Default::default()
        })
        .collect()
}

/// The first occurrence of each step in the kernel's log.
fn read_kernel_log() -> Vec<(&'static str, u64)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut found: Vec<(&'static str, u64)> = Vec::new();
    // One record per read; EAGAIN at the end of the buffer.
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        let n = match kmsg.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((step, at)) = parse_record(&String::from_utf8_lossy(&buf[..n])) {
            if !found.iter().any(|(s, _)| *s == step) {
                found.push((step, at));
            }
        }
    }
    found
}

/// `pri,seq,usec,flags;message`: the step it starts, and when.
fn parse_record(record: &str) -> Option<(&'static str, u64)> {
    let (head, message) = record.split_once(';')?;
    let at: u64 = head.split(',').nth(2)?.parse().ok()?;
    KERNEL_STEPS
        .iter()
        .find(|(prefix, _)| message.starts_with(prefix))
        .map(|(_, step)| (*step, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_records_name_their_step() {
        assert_eq!(
            parse_record("6,312,81234,-;Trying to unpack rootfs image as initramfs...\n"),
            Some(("initramfs_unpack_start", 81234))
        );
        assert_eq!(
            parse_record("6,400,912345,-;Run /init as init process\n"),
            Some(("run_init", 912345))
        );
        assert_eq!(parse_record("6,1,5,-;Linux version 6.12\n"), None);
        assert_eq!(parse_record("garbage"), None);
    }
}
