//! Hot-plugged vCPUs and memory: when the shim grows the VM (Cloud
//! Hypervisor's ACPI hot-plug), Linux adds the new CPUs offline, and memory
//! blocks too unless the kernel onlines them itself; without a udev in the
//! guest, the agent brings them online when the shim asks.

use std::io;
use std::path::Path;

/// Where sysfs is mounted in the guest.
pub const SYSFS: &str = "/sys";

/// Onlines every offline CPU and memory block under `sysfs`; how many of
/// each it brought online.
pub fn online_all(sysfs: &Path) -> io::Result<(u32, u32)> {
    let cpus = online_each(&sysfs.join("devices/system/cpu"), "cpu", "online", "0", "1")?;
    let memory = online_each(
        &sysfs.join("devices/system/memory"),
        "memory",
        "state",
        "offline",
        "online",
    )?;
    Ok((cpus, memory))
}

/// For each `<dir>/<prefix><N>/<file>` reading `offline`, writes `online`.
/// A CPU without an `online` file (cpu0) cannot go offline; a missing
/// directory means no such hot-plug in this guest.
fn online_each(
    dir: &Path,
    prefix: &str,
    file: &str,
    offline: &str,
    online: &str,
) -> io::Result<u32> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut count = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_item = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let path = entry.path().join(file);
        if !is_item || !path.exists() {
            continue;
        }
        if std::fs::read_to_string(&path)?.trim() == offline {
            std::fs::write(&path, online)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            count += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_cpus_and_memory_blocks_are_brought_online() {
        let sys = tempfile::tempdir().unwrap();
        let cpu = sys.path().join("devices/system/cpu");
        let mem = sys.path().join("devices/system/memory");
        for (dir, state) in [("cpu1", "1"), ("cpu2", "0"), ("cpu3", "0")] {
            std::fs::create_dir_all(cpu.join(dir)).unwrap();
            std::fs::write(cpu.join(dir).join("online"), state).unwrap();
        }
        std::fs::create_dir_all(cpu.join("cpu0")).unwrap();
        std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
        for (dir, state) in [("memory8", "online"), ("memory9", "offline")] {
            std::fs::create_dir_all(mem.join(dir)).unwrap();
            std::fs::write(mem.join(dir).join("state"), state).unwrap();
        }
        assert_eq!(online_all(sys.path()).unwrap(), (2, 1));
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu3/online")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(mem.join("memory9/state")).unwrap(),
            "online"
        );
        assert_eq!(online_all(sys.path()).unwrap(), (0, 0), "idempotent");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(online_all(empty.path()).unwrap(), (0, 0));
    }
}
