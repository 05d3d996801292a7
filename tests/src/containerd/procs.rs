//! Processes, commands with deadlines, and directory removal.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::POLL;

/// Fails with the command's stderr unless it exited 0.
pub fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Runs `cmd` with piped output, killing it if it outlives `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Readers on threads so a chatty child never blocks on a full pipe.
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let status = match wait_deadline(&mut child, timeout)? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {timeout:?}");
        }
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

pub(super) fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` until `timeout`; None if it is still running then.
pub(super) fn wait_deadline(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM, then SIGKILL once `timeout` has passed; reaps the child.
pub(super) fn terminate(child: &mut Child, timeout: Duration) -> Result<()> {
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    if kill(pid, Signal::SIGTERM).is_ok() && wait_deadline(child, timeout)?.is_some() {
        return Ok(());
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Waits until none of `pids` exists any more (or `timeout`).
pub(super) fn wait_gone(pids: impl Iterator<Item = i32> + Clone, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids
        .clone()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Every process id in /proc now.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `pid`'s argv; empty once it has gone (or for a kernel thread).
pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// All descendants of `root` (children, grandchildren...), from /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in all_pids() {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The comm field may hold spaces and parentheses: parse after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Paths of the unix sockets `pid` has open (a shim's listening socket):
/// matched by inode between /proc/<pid>/fd and /proc/net/unix.
pub(super) fn listening_sockets(pid: i32) -> Vec<PathBuf> {
    let inodes: HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(7)?;
            (inodes.contains(*f.get(6)?) && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

/// Removes a dir tree made of dirs only (cgroups: rmdir, never unlink) or
/// plain files (runc state).
pub(super) fn remove_tree(dir: &Path) -> Result<()> {
    if dir.starts_with("/sys/fs/cgroup") {
        for e in fs::read_dir(dir)?.flatten() {
            if e.file_type()?.is_dir() {
                remove_tree(&e.path())?;
            }
        }
        fs::remove_dir(dir)?;
    } else {
        fs::remove_dir_all(dir)?;
    }
    Ok(())
}
