//! The end of the line for PID 1. If init exits, the kernel panics and the
//! host sees a hung or crashed VM instead of a clean stop; so every fatal
//! path ends here: say why on the console, flush disks, power off. The
//! hypervisor process then exits, which the shim notices.

use nix::sys::reboot::{reboot, RebootMode};
use std::io::Write;

/// Prints `clh-agent: fatal: <msg>`, syncs, powers the VM off. Never returns.
pub fn fatal_poweroff(msg: &str) -> ! {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "clh-agent: fatal: {msg}");
    let _ = stderr.flush();
    drop(stderr);
    poweroff()
}

/// Syncs and powers off. Never returns: if reboot(2) fails, we park
/// forever rather than exit and panic the kernel.
pub fn poweroff() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_POWER_OFF);
    let _ = writeln!(std::io::stderr(), "clh-agent: power off failed: {err:?}");
    loop {
        nix::unistd::pause();
    }
}

/// As PID 1, a panic (which aborts: release builds use panic=abort) would
/// kill init and panic the kernel; report and power off instead.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| fatal_poweroff(&format!("panic: {info}"))));
}
