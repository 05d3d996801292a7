//! A pod's daemon that containerd gave up on while it still runs.
//!
//! containerd runs the binary's `delete` when it takes a shim for dead.
//! A containerd restart in the middle of RunPodSandbox (REL-CTRD-02) can
//! leave it without the daemon's address although the daemon serves: the
//! pod is then removed through `delete`, and the daemon would keep running
//! with nobody left to call its Shutdown. `delete` asks such a daemon to
//! go first (SIGTERM: it stops its VM and exits), then cleans up what is
//! left as after a crash.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Pid;

/// How often the daemon's exit is checked.
const POLL: Duration = Duration::from_millis(20);

/// Stops the daemon of pod `id` serving on `socket`, if one does: the
/// process at the socket's other end, provided its command line is this
/// binary's daemon for `id` (never another process, never this one).
/// SIGTERM, then SIGKILL once `wait` has passed.
pub async fn stop(socket: &Path, id: &str, wait: Duration) {
    let Some(pid) = daemon_pid(socket, id) else {
        return;
    };
    tracing::warn!(
        pid,
        id,
        "the pod's daemon still runs after containerd gave up on it; stopping it"
    );
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + wait;
    while crate::vm::is_running(pid.as_raw().unsigned_abs()) {
        if Instant::now() >= deadline {
            tracing::warn!(
                pid = pid.as_raw(),
                "the daemon ignored SIGTERM for {wait:?}; killing it"
            );
            let _ = kill(pid, Signal::SIGKILL);
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The pid of the daemon of `id` at the other end of `socket`.
fn daemon_pid(socket: &Path, id: &str) -> Option<i32> {
    let stream = UnixStream::connect(socket).ok()?;
    let pid = getsockopt(&stream, PeerCredentials).ok()?.pid();
    if pid <= 0 || pid == std::process::id() as i32 {
        return None;
    }
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<&[u8]> = argv.split(|&b| b == 0).collect();
    let ours = std::env::current_exe().ok()?;
    let same_binary = argv
        .first()
        .is_some_and(|a| Path::new(std::ffi::OsStr::from_bytes(a)).file_name() == ours.file_name());
    let same_id = argv
        .windows(2)
        .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
    (same_binary && same_id).then_some(pid)
}
