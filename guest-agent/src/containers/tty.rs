//! Terminals: libcontainer creates the pty inside the container and sends
//! its master over a "console socket" (SCM_RIGHTS) that we listen on.
//!
//! The builder connects to the socket before it forks, and the container
//! sends the master before it reports ready, so by the time `build()`
//! returns the connection is queued and the message sent: accepting and
//! receiving afterwards cannot block for long (bounded anyway).

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for the master once the build has returned.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens at `<dir>/<name>`.
    pub fn bind(dir: &Path, name: &str) -> io::Result<Self> {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master the container sent.
    pub fn receive(self) -> io::Result<OwnedFd> {
        let deadline = Instant::now() + RECEIVE_TIMEOUT;
        let stream = retry(deadline, || self.listener.accept().map(|(s, _)| s))?;
        stream.set_nonblocking(true)?;
        let fd = retry(deadline, || receive_fd(stream.as_raw_fd()))?;
        let _ = std::fs::remove_file(&self.path);
        Ok(fd)
    }
}

/// Retries `f` while it would block, until `deadline`.
fn retry<T>(deadline: Instant, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the container sent no pty master on its console socket",
                ))
            }
            r => return r,
        }
    }
}

fn receive_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS installed this fd in our table just
                // now; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "console socket message carried no fd",
    ))
}

/// Sets the terminal size (TIOCSWINSZ on the master).
pub fn resize(master: &OwnedFd, width: u32, height: u32) -> io::Result<()> {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    let ws = libc::winsize {
        ws_row: clamp(height),
        ws_col: clamp(width),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the fd is an open pty master we own for the whole call, and
    // `ws` is a valid winsize that outlives it; TIOCSWINSZ only reads it.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::os::unix::net::UnixStream;

    #[test]
    fn receives_a_sent_fd_and_resizes_a_pty() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(dir.path(), "console.sock").unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let client = UnixStream::connect(sock.path()).unwrap();
        let fds = [pty.master.as_raw_fd()];
        let iov = [IoSlice::new(b"/dev/ptmx")];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(client.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        let master = sock.receive().unwrap();
        resize(&master, 100, 40).unwrap();
        let size = nix::sys::termios::tcgetattr(&pty.slave).map(|_| ());
        assert!(size.is_ok());
    }

    #[test]
    fn no_sender_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(dir.path(), "c.sock").unwrap();
        let _client = UnixStream::connect(sock.path()).unwrap();
        let started = Instant::now();
        let err = sock.receive().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < RECEIVE_TIMEOUT * 2);
    }
}
