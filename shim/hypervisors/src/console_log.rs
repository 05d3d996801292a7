//! The guest's serial console on the host, bounded.
//!
//! The guest controls what it prints, so its console must not be able to
//! fill the host's /run. The VMM does not write a file: it writes into a
//! FIFO (`console.pipe`, 0600 in the VM directory), and a task of the shim
//! copies it into `console.log`, which is rotated to `console.log.1` when
//! it reaches half the cap: the two together never exceed the cap, and the
//! newest output is always kept. The same task spots the kernel's last
//! words (`reboot: Power down`), for the QEMU backend's power-off watcher,
//! and the agent's "serving ttrpc" line, after which the QEMU backend lets
//! the shim connect to the guest's vsock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::process::ManagedProcess;
use crate::{Error, Result};

/// Cap of `console.log` and `console.log.1` together when the
/// configuration sets none.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 20;

/// The smallest cap: below it a rotation would keep too little to
/// diagnose a failed boot.
pub const MIN_MAX_BYTES: u64 = 16 << 10;

/// The FIFO the VMM writes the console into, in the VM directory.
const PIPE: &str = "console.pipe";

/// Kernel messages after which the guest does nothing more. The kernel
/// prints them at emergency level, so even with `quiet`.
const FINAL_MESSAGES: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// What the agent prints once it listens on its ttrpc port
/// (guest-agent/src/main.rs): its vsock driver is up by then.
pub const AGENT_SERVING_MESSAGE: &str = "serving ttrpc on vsock";

/// Bytes kept from the previous read, so a message split across two reads
/// is still found.
const OVERLAP: usize = 64;

/// The FIFO the VMM of the VM in `dir` writes its serial console into.
pub fn pipe_path(dir: &Path) -> PathBuf {
    dir.join(PIPE)
}

/// The rotated-out older half of `log`.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file capped at `max_bytes` over itself and one rotated file.
pub struct BoundedLog {
    path: PathBuf,
    file: File,
    written: u64,
    /// Each file's share of the cap.
    half: u64,
}

impl BoundedLog {
    /// Creates (truncates) `path`, owner-only.
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: open_log(path)?,
            written: 0,
            half: (max_bytes / 2).max(1),
        })
    }

    /// Appends `bytes`, rotating whenever the current file is full.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            if self.written >= self.half {
                self.rotate()?;
            }
            let room = usize::try_from(self.half - self.written).unwrap_or(usize::MAX);
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now).map_err(|source| Error::Io {
                what: "cannot write the console log",
                path: self.path.clone(),
                source,
            })?;
            self.written += now.len() as u64;
            bytes = later;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        let old = rotated_path(&self.path);
        std::fs::rename(&self.path, &old).map_err(|source| Error::Io {
            what: "cannot rotate the console log",
            path: old,
            source,
        })?;
        self.file = open_log(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::Io {
            what: "cannot create the console log",
            path: path.to_path_buf(),
            source,
        })
}

/// The FIFO and the task copying it into the bounded log. Dropping it
/// stops the task and removes the FIFO.
pub struct ConsoleLog {
    pipe: PathBuf,
    copier: JoinHandle<()>,
    powered_off: watch::Receiver<bool>,
    agent_serving: watch::Receiver<bool>,
}

impl ConsoleLog {
    /// Makes the FIFO of the VM in `dir` and starts copying it into `log`
    /// (capped at `max_bytes`). Must run before the VMM opens the FIFO:
    /// the copier holds it open for reading and writing, so the VMM's open
    /// never blocks and the copier never sees end-of-file.
    pub fn start(dir: &Path, log: &Path, max_bytes: u64) -> Result<Self> {
        let pipe = pipe_path(dir);
        let io_err = |what, source| Error::Io {
            what,
            path: pipe.clone(),
            source,
        };
        match std::fs::remove_file(&pipe) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove an old console FIFO", e))
            }
            _ => {}
        }
        nix::unistd::mkfifo(
            &pipe,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(|e| io_err("cannot create the console FIFO", e.into()))?;
        let opened = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&pipe)
            .map_err(|e| io_err("cannot open the console FIFO", e));
        let made = opened.and_then(|rx| Ok((rx, BoundedLog::create(log, max_bytes)?)));
        let (receiver, bounded) = match made {
            Ok(made) => made,
            Err(e) => {
                let _ = std::fs::remove_file(&pipe);
                return Err(e);
            }
        };
        let (off_tx, powered_off) = watch::channel(false);
        let (serving_tx, agent_serving) = watch::channel(false);
        let seen = Seen {
            powered_off: off_tx,
            agent_serving: serving_tx,
        };
        let copier = tokio::spawn(copy(receiver, bounded, seen));
        Ok(Self {
            pipe,
            copier,
            powered_off,
            agent_serving,
        })
    }

    /// The FIFO to give the VMM as its serial console file.
    pub fn pipe(&self) -> &Path {
        &self.pipe
    }

    /// Becomes `true` once the guest kernel has printed that it powered
    /// off or halted.
    pub fn powered_off(&self) -> watch::Receiver<bool> {
        self.powered_off.clone()
    }

    /// Becomes `true` once the agent has printed [`AGENT_SERVING_MESSAGE`].
    pub fn agent_serving(&self) -> watch::Receiver<bool> {
        self.agent_serving.clone()
    }

    /// Until the agent has printed that it serves, within `timeout`; fails
    /// early, with `vmm`'s exit and log, if the VMM writing this console
    /// exits, or if the console ends without the line.
    pub async fn wait_agent_serving(
        &self,
        vmm: &ManagedProcess,
        timeout: Duration,
        what: &str,
    ) -> Result<()> {
        let mut serving = self.agent_serving();
        let seen = async {
            serving
                .wait_for(|s| *s)
                .await
                .map(|_| ())
                // The copier ended: the VMM closed its end of the console.
                .map_err(|_| vmm.exited_early())
        };
        vmm.within(timeout, what, seen).await
    }
}

/// What the copier has spotted in the console so far.
struct Seen {
    powered_off: watch::Sender<bool>,
    agent_serving: watch::Sender<bool>,
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        self.copier.abort();
        let _ = std::fs::remove_file(&self.pipe);
    }
}

async fn copy(mut pipe: tokio::net::unix::pipe::Receiver, mut log: BoundedLog, seen: Seen) {
    let mut buf = vec![0u8; 64 << 10];
    let mut carry = String::new();
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reading the guest console stopped");
                return;
            }
        };
        if let Err(e) = log.write(&buf[..n]) {
            // Keep draining: a VMM blocked on a full pipe would stall its
            // vCPU. The output is lost, the VM is not.
            tracing::warn!(error = %e, "guest console output dropped");
        }
        let (final_message, serving) = scan(&mut carry, &buf[..n]);
        if serving && !*seen.agent_serving.borrow() {
            let _ = seen.agent_serving.send(true);
        }
        if final_message && !*seen.powered_off.borrow() {
            let _ = seen.powered_off.send(true);
        }
    }
}

/// Whether `chunk`, after what `carry` kept of the previous ones, holds
/// one of the kernel's final messages (the first value) or the agent's
/// [`AGENT_SERVING_MESSAGE`] (the second); keeps the tail in `carry`.
fn scan(carry: &mut String, chunk: &[u8]) -> (bool, bool) {
    carry.push_str(&String::from_utf8_lossy(chunk));
    let seen = (
        FINAL_MESSAGES.iter().any(|m| carry.contains(m)),
        carry.contains(AGENT_SERVING_MESSAGE),
    );
    let keep_from = carry.len().saturating_sub(OVERLAP);
    let keep_from = (keep_from..carry.len())
        .find(|i| carry.is_char_boundary(*i))
        .unwrap_or(carry.len());
    carry.drain(..keep_from);
    seen
}

/// Whether `chunk` (after `carry`) holds one of the kernel's final messages.
#[cfg(test)]
fn saw_final_message(carry: &mut String, chunk: &[u8]) -> bool {
    scan(carry, chunk).0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn a_flood_stays_under_the_cap_and_keeps_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::create(&path, 1000).unwrap();
        for i in 0..1000u32 {
            log.write(format!("line {i}\n").as_bytes()).unwrap();
        }
        log.write(&[b'x'; 2500]).unwrap();
        log.write(b"last words\n").unwrap();
        let total = size(&path) + size(&rotated_path(&path));
        assert!(total <= 1000, "{total} bytes kept");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("last words\n"), "{text:?}");
    }

    #[test]
    fn final_messages_are_found_across_reads() {
        let mut carry = String::new();
        assert!(!saw_final_message(&mut carry, &[b'.'; 5000]));
        assert!(!saw_final_message(&mut carry, b"[ 1.0] reboot: Pow"));
        assert!(saw_final_message(&mut carry, b"er down\n"));
        assert!(carry.len() < 200);
    }

    #[test]
    fn the_agent_serving_line_is_found_across_reads() {
        let mut carry = String::new();
        assert_eq!(scan(&mut carry, &[b'.'; 5000]), (false, false));
        assert_eq!(
            scan(&mut carry, b"[ 5.6] INFO serving ttrpc on vs"),
            (false, false)
        );
        assert_eq!(scan(&mut carry, b"ock://-1:1024\n"), (false, true));
        assert!(carry.len() < 200);
    }

    // Two workers: the test writes into the FIFO with blocking calls while
    // the copier drains it (the pipe holds less than the test writes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_is_written_into_the_fifo_lands_in_the_bounded_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let console = ConsoleLog::start(dir.path(), &log, MIN_MAX_BYTES).unwrap();
        let mode = std::fs::metadata(console.pipe()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // As a VMM opens it: write-only, create, truncate.
        let mut writer = std::fs::File::create(console.pipe()).unwrap();
        let mut powered_off = console.powered_off();
        for _ in 0..100 {
            writer.write_all(&[b'y'; 1024]).unwrap();
        }
        writer.write_all(b"\nreboot: Power down\n").unwrap();
        tokio::time::timeout(Duration::from_secs(10), powered_off.wait_for(|p| *p))
            .await
            .unwrap()
            .unwrap();
        assert!(size(&log) + size(&rotated_path(&log)) <= MIN_MAX_BYTES);
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .ends_with("Power down\n"));
        let pipe = console.pipe().to_path_buf();
        drop(console);
        assert!(!pipe.exists());
    }
}
