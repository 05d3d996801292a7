//! Logging to stderr, which is the console when we are PID 1.

use tracing::Level;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Timestamps in seconds since boot (CLOCK_BOOTTIME), like the kernel's own
/// printk prefix, so agent lines line up with kernel lines on the console
/// and boot phases can be timed from a console log.
struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            Ok(ts) => write!(w, "[{:5}.{:06}]", ts.tv_sec(), ts.tv_nsec() / 1000),
            Err(_) => w.write_str("[     ?     ]"),
        }
    }
}

/// Installs the global subscriber. Call once.
pub fn init(level: Level) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .with_timer(BootTime)
        .with_target(false)
        .init();
}
