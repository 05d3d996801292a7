//! Ends QEMU when the guest powers off or halts.
//!
//! With ACPI a guest `reboot(RB_POWER_OFF)` ends QEMU by itself; without a
//! working ACPI power-off (or on RB_HALT_SYSTEM) it only halts the vCPUs and
//! QEMU would run forever. This watcher is the backstop. The kernel always prints
//! `reboot: Power down` (emergency level, so even with `quiet`) just before,
//! so we watch the serial console file for it. A guest can print that line
//! on purpose, but all it achieves is stopping its own VM.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Weak;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::ManagedProcess;

/// Kernel messages after which the guest does nothing more.
const FINAL_MESSAGES: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// How often the console file is checked for new output; a power-off is
/// noticed at most this late.
const POLL: Duration = Duration::from_millis(50);

/// Bytes kept from the previous read, so a message split across two reads
/// is still found.
const OVERLAP: usize = 64;

/// Watches `console` until QEMU exits (or its handle is dropped), sending it
/// SIGTERM once the guest has powered off or halted.
pub fn spawn_power_off_watcher(console: PathBuf, qemu: Weak<ManagedProcess>) {
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut carry = String::new();
        loop {
            let Some(process) = qemu.upgrade() else {
                return;
            };
            if process.exited().is_some() {
                return;
            }
            let chunk = read_from(&console, &mut offset);
            carry.push_str(&chunk);
            if FINAL_MESSAGES.iter().any(|m| carry.contains(m)) {
                tracing::info!(pid = process.pid(), "guest powered off; stopping QEMU");
                process.signal(Signal::SIGTERM);
                return;
            }
            let keep_from = carry.len().saturating_sub(OVERLAP);
            let keep_from = (keep_from..carry.len())
                .find(|i| carry.is_char_boundary(*i))
                .unwrap_or(carry.len());
            carry.drain(..keep_from);
            drop(process);
            tokio::time::sleep(POLL).await;
        }
    });
}

/// New bytes of `path` from `offset` on (lossily decoded); empty if the
/// file does not exist yet.
fn read_from(path: &std::path::Path, offset: &mut u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(*offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    *offset += bytes.len() as u64;
    String::from_utf8_lossy(&bytes).into_owned()
}
