//! Logging to stderr, which is the console when we are PID 1.

use tracing::Level;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

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

/// Our own close-on-exec copy of stderr. Container processes are forked
/// from the agent and get their stdio on fds 0-2 before they exec; logging
/// through fd 2 would put the agent's (and libcontainer's) log lines into
/// the container's stderr. This fd keeps them on the console instead, and
/// is closed by the container's exec.
fn log_fd() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned()?;
    Ok(fd.into())
}

/// Installs the global subscriber. Call once.
pub fn init(level: Level) {
    let builder = tracing_subscriber::fmt();
    let builder = match log_fd() {
        Ok(file) => builder.with_writer(BoxMakeWriter::new(std::sync::Arc::new(file))),
        Err(_) => builder.with_writer(BoxMakeWriter::new(std::io::stderr)),
    };
    builder
        .with_max_level(level)
        .with_ansi(false)
        .with_timer(BootTime)
        .with_target(false)
        .init();
}
