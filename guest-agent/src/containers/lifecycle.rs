//! Create, exec, start, signal and remove: the calls that drive
//! libcontainer. Its calls block (they fork and wait on pipes), so they run
//! on the blocking pool; those that fork run inside the reaper's
//! `spawn_registered`, so a process that exits at once is still delivered
//! to us and not reaped as an orphan.

use super::exec_seccomp;
use super::executor::ContainerExec;
use super::process::{ChildStdio, Proc};
use super::tty::ConsoleSocket;
use super::{
    cgroup_dir, lock, Containers, CtrError, Entry, PendingExec, Result, BUNDLE_ROOT, CGROUP_PARENT,
    STATE_ROOT,
};
use clh_agent_protocol::{check_id, Stdio, EPHEMERAL_DIR};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Process, Spec};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How long Remove waits for killed processes to be reaped.
const REMOVE_GRACE: Duration = Duration::from_secs(5);
/// Console sockets (short names; see `console_socket`).
const CONSOLE_DIR: &str = "/run/clh/tty";

/// Ids name directories and cgroups: the protocol's one id rule
/// ([`check_id`]), refused as InvalidArgument.
pub(crate) fn validate_id(what: &str, id: &str) -> Result<()> {
    check_id(id).map_err(|e| CtrError::InvalidArgument(format!("invalid {what} {id:?}: {e}")))
}

fn builder(
    id: &str,
    stdio: ChildStdio,
    console: Option<&ConsoleSocket>,
) -> Result<ContainerBuilder> {
    ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(STATE_ROOT)
        .map_err(|e| CtrError::internal("setting libcontainer's state root", e))
        .map(|b| {
            b.with_stdin(stdio.stdin)
                .with_stdout(stdio.stdout)
                .with_stderr(stdio.stderr)
                .with_console_socket(console.map(ConsoleSocket::path))
        })
}

/// The guest directories of the spec's memory-backed volumes (see
/// `EPHEMERAL_DIR`), refusing any source that is not one plain name below
/// it. Pure: [`make_ephemeral_dirs`] creates them.
pub(crate) fn ephemeral_dirs(spec: &Spec) -> Result<Vec<PathBuf>> {
    let root = Path::new(EPHEMERAL_DIR);
    let mut dirs = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let Some(source) = m.source().as_ref() else {
            continue;
        };
        let Ok(rest) = source.strip_prefix(root) else {
            continue;
        };
        let mut parts = rest.components();
        let plain = matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        );
        if !plain {
            return Err(CtrError::InvalidArgument(format!(
                "memory volume source {} must be one plain name below {EPHEMERAL_DIR}",
                source.display()
            )));
        }
        dirs.push(source.clone());
    }
    Ok(dirs)
}

/// Creates the guest directories of the spec's memory-backed volumes.
fn make_ephemeral_dirs(spec: &Spec) -> Result<()> {
    for dir in ephemeral_dirs(spec)? {
        std::fs::create_dir_all(&dir)
            .map_err(|e| CtrError::internal(format!("creating {}", dir.display()), e))?;
    }
    Ok(())
}

/// A console socket for a terminal process, at a short path (sun_path
/// holds 108 bytes; bundle paths with long ids do not fit).
fn console_socket(terminal: bool) -> Result<Option<ConsoleSocket>> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if !terminal {
        return Ok(None);
    }
    let dir = Path::new(CONSOLE_DIR);
    std::fs::create_dir_all(dir).map_err(|e| CtrError::internal("creating /run/clh/tty", e))?;
    let name = format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed));
    ConsoleSocket::bind(dir, &name)
        .map(Some)
        .map_err(|e| CtrError::internal("binding the console socket", e))
}

fn receive_master(console: Option<ConsoleSocket>) -> Result<Option<OwnedFd>> {
    console
        .map(ConsoleSocket::receive)
        .transpose()
        .map_err(|e| CtrError::internal("receiving the pty master", e))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CtrError::internal("blocking task", e))?
}

/// CreateContainer's spec as the container gets it: `spec_json` parsed,
/// a terminal if the spec or the request (`terminal`) asks for one, and
/// our cgroup whatever the host chose. Pure: nothing is touched yet.
pub(crate) fn prepare_spec(id: &str, spec_json: &[u8], terminal: bool) -> Result<(Spec, bool)> {
    validate_id("container id", id)?;
    let mut spec: Spec = serde_json::from_slice(spec_json)
        .map_err(|e| CtrError::InvalidArgument(format!("bad OCI spec JSON: {e}")))?;
    let terminal = terminal || spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
    if let Some(process) = spec.process_mut() {
        process.set_terminal(Some(terminal));
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("/{CGROUP_PARENT}/{id}"))));
    }
    Ok((spec, terminal))
}

/// ExecProcess's process as it will run: `process_json` parsed, with a
/// terminal if it or the request (`terminal`) asks for one.
pub(crate) fn prepare_process(process_json: &[u8], terminal: bool) -> Result<(Process, bool)> {
    let mut process: Process = serde_json::from_slice(process_json)
        .map_err(|e| CtrError::InvalidArgument(format!("bad OCI process JSON: {e}")))?;
    let terminal = terminal || process.terminal() == Some(true);
    process.set_terminal(Some(terminal));
    Ok((process, terminal))
}

impl Containers {
    /// Sets up the container and its init process, not started; the
    /// caller (`create`, in `unheard`) has claimed `id` and registers the
    /// entry.
    pub(super) async fn build(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: &Stdio,
    ) -> Result<(u32, Entry)> {
        let (spec, terminal) = prepare_spec(id, spec_json, stdio.terminal)?;
        let root = spec.root().as_ref().map(|r| r.path().clone());
        let root = root.ok_or_else(|| CtrError::InvalidArgument("spec has no root".into()))?;
        if !root.is_dir() {
            return Err(CtrError::InvalidArgument(format!(
                "rootfs {} is not a directory in the guest",
                root.display()
            )));
        }
        super::kernel_fs_targets::check(&spec, &root)?;
        make_ephemeral_dirs(&spec)?;

        let _build = self.build_lock.lock().await;
        let bundle = Path::new(BUNDLE_ROOT).join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| CtrError::internal(format!("creating {}", bundle.display()), e))?;
        let config = bundle.join("config.json");
        spec.save(&config)
            .map_err(|e| CtrError::internal(format!("writing {}", config.display()), e))?;

        let (proc, child) = new_proc(terminal, stdio)?;
        let proc = Arc::new(proc);
        let (reaper, owned_id, bundle2) = (self.reaper.clone(), id.to_owned(), bundle.clone());
        let built = blocking(move || {
            let console = console_socket(terminal)?;
            let (container, rx) = reaper.spawn_registered(|| {
                let container = builder(&owned_id, child, console.as_ref())?
                    .with_executor(ContainerExec { seccomp: None })
                    .as_init(&bundle2)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(|e| CtrError::internal("creating the container", e))?;
                let pid = container.pid().ok_or_else(|| CtrError::Internal {
                    what: "libcontainer returned no init pid".into(),
                    source: None,
                })?;
                // libcontainer's nix is another version than ours.
                Ok((Pid::from_raw(pid.as_raw()), container))
            })?;
            Ok((container, rx, receive_master(console)?))
        })
        .await;
        let (container, rx, master) = match built {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let pid = container.pid().map_or(0, |p| p.as_raw());
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        proc.started(pid, rx);
        if let Some(master) = master {
            (proc.set_terminal(master)).map_err(|e| CtrError::internal("keeping the pty", e))?;
        }
        let entry = Entry {
            id: id.to_owned(),
            container: Mutex::new(container),
            init: proc,
            execs: Mutex::default(),
            pending: Mutex::default(),
            bundle,
            seccomp,
        };
        info!(id, pid, "container created");
        Ok((pid as u32, entry))
    }

    /// Registers an exec: its stdio now (the shim attaches before Start),
    /// the process itself at Start.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdio: &Stdio) -> Result<()> {
        validate_id("exec id", exec_id)?;
        let entry = self.get(id)?;
        let (mut process, terminal) = prepare_process(process_json, stdio.terminal)?;
        let seccomp = (entry.seccomp.as_ref())
            .map(|filter| exec_seccomp::prepare(&mut process, filter))
            .transpose()?;
        let mut execs = lock(&entry.execs);
        if execs.contains_key(exec_id) {
            return Err(CtrError::AlreadyExists(format!(
                "exec {exec_id:?} already exists in container {id:?}"
            )));
        }
        let spec_path = entry.bundle.join(format!("exec-{exec_id}.json"));
        let text = serde_json::to_vec(&process)
            .map_err(|e| CtrError::internal("serializing the process", e))?;
        std::fs::write(&spec_path, text)
            .map_err(|e| CtrError::internal(format!("writing {}", spec_path.display()), e))?;
        let (proc, child) = new_proc(terminal, stdio)?;
        execs.insert(exec_id.to_owned(), Arc::new(proc));
        let pending = PendingExec {
            spec_path,
            stdio: child,
            terminal,
            seccomp,
        };
        lock(&entry.pending).insert(exec_id.to_owned(), pending);
        Ok(())
    }

    /// Starts init (empty exec_id) or a registered exec; returns its pid.
    /// The caller is `start` (in `unheard`).
    pub(super) async fn start_now(&self, id: &str, exec_id: &str) -> Result<u32> {
        let entry = self.get(id)?;
        let proc = entry.process(exec_id)?;
        if exec_id.is_empty() {
            let mut container = lock(&entry.container).clone();
            let started = blocking(move || {
                container
                    .start()
                    .map_err(|e| CtrError::FailedPrecondition(format!("starting: {e}")))?;
                Ok(container)
            })
            .await?;
            *lock(&entry.container) = started;
            return Ok(proc.pid().map_or(0, |p| p as u32));
        }
        let pending = lock(&entry.pending).remove(exec_id).ok_or_else(|| {
            CtrError::FailedPrecondition(format!("exec {exec_id:?} was already started"))
        })?;
        if proc.exit().is_some() || entry.init.exit().is_some() {
            return Err(CtrError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        let _build = self.build_lock.lock().await;
        let (reaper, owned_id) = (self.reaper.clone(), id.to_owned());
        let (pid, rx, master) = blocking(move || {
            let console = console_socket(pending.terminal)?;
            let (pid, rx) = reaper.spawn_registered(|| {
                let executor = ContainerExec {
                    seccomp: pending.seccomp,
                };
                let pid = builder(&owned_id, pending.stdio, console.as_ref())?
                    .with_executor(executor)
                    .as_tenant()
                    .with_process(Some(&pending.spec_path))
                    .with_detach(true)
                    .build()
                    .map_err(|e| CtrError::internal("starting the exec", e))?;
                Ok((Pid::from_raw(pid.as_raw()), pid.as_raw()))
            })?;
            Ok((pid, rx, receive_master(console)?))
        })
        .await?;
        proc.started(pid, rx);
        if let Some(master) = master {
            (proc.set_terminal(master)).map_err(|e| CtrError::internal("keeping the pty", e))?;
        }
        info!(id, exec_id, pid, "exec started");
        Ok(pid as u32)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let entry = self.get(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| CtrError::InvalidArgument(format!("invalid signal {signal}")))?;
        if all {
            return signal_all(&entry, sig);
        }
        let proc = entry.process(exec_id)?;
        let pid = match (proc.pid(), proc.exit()) {
            (Some(pid), None) => pid,
            (None, _) => {
                return Err(CtrError::FailedPrecondition(format!(
                    "process {exec_id:?} of {id:?} is not started"
                )))
            }
            (Some(_), Some(_)) => {
                return Err(CtrError::NotFound(format!(
                    "process {exec_id:?} of {id:?} has already exited"
                )))
            }
        };
        kill(Pid::from_raw(pid), sig)
            .map_err(|e| CtrError::internal(format!("kill({pid}, {sig})"), e))
    }

    /// Kills what is left, deletes the container and its bundle. A
    /// container still being created is removed once built.
    pub async fn remove(&self, id: &str) -> Result<()> {
        if self.cancel_creation(id) {
            return Ok(());
        }
        let entry = self.get(id)?;
        if let Err(e) = signal_all(&entry, Signal::SIGKILL) {
            warn!(id, "killing leftovers: {e}");
        }
        let mut procs: Vec<Arc<Proc>> = lock(&entry.execs).values().cloned().collect();
        procs.push(entry.init.clone());
        for proc in procs.iter().filter(|p| p.pid().is_some()) {
            if tokio::time::timeout(REMOVE_GRACE, proc.wait())
                .await
                .is_err()
            {
                warn!(id, pid = proc.pid(), "process not reaped after SIGKILL");
            }
        }
        let mut container = lock(&entry.container).clone();
        blocking(move || {
            container
                .delete(true)
                .map_err(|e| CtrError::internal("deleting the container", e))
        })
        .await?;
        lock(&self.map).remove(id);
        if let Err(e) = std::fs::remove_dir_all(&entry.bundle) {
            warn!(id, "removing {}: {e}", entry.bundle.display());
        }
        info!(id, "container removed");
        Ok(())
    }
}

fn new_proc(terminal: bool, stdio: &Stdio) -> Result<(Proc, ChildStdio)> {
    let made = if terminal {
        Proc::new_terminal(stdio.stdin)
    } else {
        Proc::new(stdio.stdin, stdio.stdout, stdio.stderr)
    };
    made.map_err(|e| CtrError::internal("creating stdio pipes", e))
}

fn signal_all(entry: &Entry, sig: Signal) -> Result<()> {
    let pids = super::cgroup::pids(&cgroup_dir(&entry.id))
        .map_err(|e| CtrError::internal("listing the container's pids", e))?;
    for pid in pids {
        // ESRCH: it exited meanwhile, which is what we wanted anyway.
        match kill(Pid::from_raw(pid as i32), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(CtrError::internal(format!("kill({pid}, {sig})"), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule itself is tested in clh-agent-protocol; here, that a bad
    /// id is refused as InvalidArgument, naming what it was.
    #[test]
    fn a_bad_id_is_an_invalid_argument() {
        assert!(validate_id("exec id", "abc-1_2.3").is_ok());
        for bad in ["", "..", "a/b", &"x".repeat(65)] {
            match validate_id("exec id", bad) {
                Err(e @ CtrError::InvalidArgument(_)) => {
                    assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
                    assert!(e.to_string().contains("invalid exec id"), "{e}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
