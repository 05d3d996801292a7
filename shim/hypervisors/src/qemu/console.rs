//! Ends QEMU when the guest powers off or halts.
//!
//! With ACPI a guest `reboot(RB_POWER_OFF)` ends QEMU by itself; without a
//! working ACPI power-off (or on RB_HALT_SYSTEM) it only halts the vCPUs and
//! QEMU would run forever. This watcher is the backstop. The kernel always
//! prints `reboot: Power down` (emergency level, so even with `quiet`) just
//! before; the console's copier ([`crate::console_log`]) spots it. A guest
//! can print that line on purpose, but all it achieves is stopping its own
//! VM.

use std::sync::Weak;

use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::process::ManagedProcess;

/// Waits until QEMU exits (or its handle is dropped), sending it SIGTERM
/// once `powered_off` says the guest has powered off or halted.
pub fn spawn_power_off_watcher(mut powered_off: watch::Receiver<bool>, qemu: Weak<ManagedProcess>) {
    tokio::spawn(async move {
        // Ends with an error when the console copier is gone (VM stopped).
        if powered_off.wait_for(|off| *off).await.is_err() {
            return;
        }
        let Some(process) = qemu.upgrade() else {
            return;
        };
        if process.exited().is_none() {
            tracing::info!(pid = process.pid(), "guest powered off; stopping QEMU");
            process.signal(Signal::SIGTERM);
        }
    });
}
