//! One pod's VM: its state directory, virtiofsd, the hypervisor and the
//! agent connection, started and stopped as one unit.
//!
//! Layout of `root/<id>/`: `private/` (where the host mounts) and `shared/`
//! (its read-only export, served by virtiofsd; see shared_mount.rs),
//! `staging/` (where recursive binds are trimmed; submounts.rs),
//! `virtiofsd.sock`, the backend's sockets and logs, `console.log`, and
//! `state.json` (the pids and their command lines, so [`cleanup_leftovers`]
//! can finish the job after a shim crash). It is removed without ever
//! crossing a mount (remove_tree.rs).

use std::fs::Permissions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clh_agent_client::AgentClient;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{new_backend, Backend, Binaries, Hypervisor, SharedFs, VmSize, VmSpec};
use serde::{Deserialize, Serialize};

use crate::shared_mount::{
    export_dir, make_export, private_dir, remove_container_dir, remove_vm_dir,
};

pub use clh_agent_protocol::SHARED_FS_TAG;
/// Lines of each log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub backend: Backend,
    pub binaries: Binaries,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// What the VM may grow to (Cloud Hypervisor hot-plug); `None`: never.
    pub max: Option<VmSize>,
    pub extra_kernel_params: Vec<String>,
    pub debug: bool,
    /// Cap of the guest console log (`console.log` and `console.log.1`).
    pub console_log_max_bytes: u64,
    pub vmm_start_timeout: Duration,
    pub agent_timeout: Duration,
    pub stop_timeout: Duration,
}

/// What `state.json` records: enough to kill what we started, and only it.
#[derive(Debug, Serialize, Deserialize)]
struct PersistedState {
    processes: Vec<PersistedProcess>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedProcess {
    pid: u32,
    /// `/proc/<pid>/cmdline` at start, NUL-separated: a recycled pid has
    /// another command line.
    cmdline: Vec<u8>,
}

pub struct PodVm {
    dir: PathBuf,
    virtiofsd: Virtiofsd,
    hypervisor: Box<dyn Hypervisor>,
    agent: AgentClient,
    stop_timeout: Duration,
    /// Time from spawning the VMM to the agent's Version reply.
    boot_to_agent: Duration,
}

impl PodVm {
    /// Creates `root/<id>/`, starts virtiofsd and the VM, and connects to the
    /// agent. On failure nothing is left running and the directory is gone;
    /// the error quotes the guest console and VMM logs.
    pub async fn start(id: &str, root: &Path, opts: &VmOptions) -> anyhow::Result<PodVm> {
        validate_id(id)?;
        let dir = root.join(id);
        clh_hypervisor::check_vm_dir(&dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create the VM state root {}", root.display()))?;
        // Not recursive: an existing directory means another VM or a
        // leftover, and must not be reused. Owner-only whatever the umask:
        // it holds the VMM's API and vsock sockets.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, Permissions::from_mode(0o700)))
            .with_context(|| format!("cannot create the VM directory {}", dir.display()))?;
        let mut parts = Parts::default();
        match start_in(id, &dir, opts, &mut parts).await {
            Ok((agent, boot_to_agent)) => match (parts.virtiofsd, parts.hypervisor) {
                (Some(virtiofsd), Some(hypervisor)) => Ok(PodVm {
                    dir,
                    virtiofsd,
                    hypervisor,
                    agent,
                    stop_timeout: opts.stop_timeout,
                    boot_to_agent,
                }),
                _ => bail!("internal error: VM parts missing after a successful start"),
            },
            Err(e) => {
                let report = failure_report(&dir, opts.backend);
                stop_parts(&mut parts, opts.stop_timeout).await;
                if let Err(rm) = remove_vm_dir(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %format!("{rm:#}"), "cannot remove VM directory");
                }
                Err(e.context(format!("failed to start VM {id}{report}")))
            }
        }
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid-vsock socket: agent (port 1024) and stdio (port 1025).
    pub fn vsock_socket(&self) -> PathBuf {
        self.hypervisor.vsock_socket()
    }

    pub fn boot_to_agent(&self) -> Duration {
        self.boot_to_agent
    }

    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.hypervisor.pids();
        if self.virtiofsd.exited().is_none() {
            pids.push(self.virtiofsd.pid());
        }
        pids
    }

    /// Grows the VM towards `target` (never shrinks); the size in effect.
    pub async fn resize(&self, target: VmSize) -> clh_hypervisor::Result<VmSize> {
        self.hypervisor.resize(target).await
    }

    /// Resolves when the VMM has exited, with how it ended.
    pub async fn wait_exit(&self) -> String {
        self.hypervisor.wait_exit().await
    }

    /// Stops the VM, then virtiofsd, and removes the directory.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let vm = self.hypervisor.stop(self.stop_timeout).await;
        let fs = self.virtiofsd.stop(self.stop_timeout).await;
        let rm = remove_vm_dir(&self.dir);
        vm.context("stopping the VM")?;
        fs.context("stopping virtiofsd")?;
        rm
    }
}

#[derive(Default)]
struct Parts {
    virtiofsd: Option<Virtiofsd>,
    hypervisor: Option<Box<dyn Hypervisor>>,
}

async fn stop_parts(parts: &mut Parts, timeout: Duration) {
    if let Some(hv) = parts.hypervisor.as_mut() {
        if let Err(e) = hv.stop(timeout).await {
            tracing::warn!(error = %e, "stopping the VM after a failed start");
        }
    }
    if let Some(fs) = parts.virtiofsd.as_mut() {
        if let Err(e) = fs.stop(timeout).await {
            tracing::warn!(error = %e, "stopping virtiofsd after a failed start");
        }
    }
}

async fn start_in(
    id: &str,
    dir: &Path,
    opts: &VmOptions,
    parts: &mut Parts,
) -> anyhow::Result<(AgentClient, Duration)> {
    make_export(dir)?;
    let shared = export_dir(dir);
    let fs_socket = dir.join(clh_hypervisor::virtiofsd::SOCKET_NAME);
    let virtiofsd = Virtiofsd::start(
        &opts.binaries.virtiofsd,
        &shared,
        &fs_socket,
        &dir.join("virtiofsd.log"),
        opts.vmm_start_timeout,
    )
    .await
    .context("virtiofsd did not start")?;
    let fs = parts.virtiofsd.insert(virtiofsd);
    let spec = VmSpec {
        id: id.to_string(),
        dir: dir.to_path_buf(),
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        max: opts.max,
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        cmdline: kernel_cmdline(opts),
        shared_fs: Some(SharedFs {
            socket: fs.socket().to_path_buf(),
            tag: SHARED_FS_TAG.to_string(),
        }),
        console_log: dir.join("console.log"),
        console_log_max_bytes: opts.console_log_max_bytes,
        start_timeout: opts.vmm_start_timeout,
    };
    let spawned = Instant::now();
    let hypervisor = parts
        .hypervisor
        .insert(new_backend(opts.backend, &opts.binaries));
    hypervisor
        .start(&spec)
        .await
        .context("the VMM did not start")?;
    let mut pids = hypervisor.pids();
    pids.push(fs.pid());
    persist_state(dir, &pids)?;
    let uds = hypervisor.vsock_socket();
    restrict_sockets(dir)?;
    let agent = tokio::select! {
        agent = AgentClient::connect(&uds, opts.agent_timeout) => agent.context("the guest agent did not answer")?,
        exit = hypervisor.wait_exit() => bail!("the VMM exited before the agent answered ({exit})"),
    };
    seed_guest_rng(&agent).await?;
    Ok((agent, spawned.elapsed()))
}

/// Sends the guest a fresh RNG seed over the agent connection and checks
/// that its CRNG is initialised, before any container can start. Not on
/// the kernel command line: the guest's /proc/cmdline is readable by every
/// container, and the host's by every process (QEMU's argv).
async fn seed_guest_rng(agent: &AgentClient) -> anyhow::Result<()> {
    let seed = random_seed()?;
    let reply = agent
        .seed_random(&seed)
        .await
        .context("the guest agent refused the RNG seed")?;
    if !reply.crng_ready {
        bail!(
            "the guest's RNG is not initialised after crediting {} bytes of host entropy (entropy_avail {}); its kernel must support RNDADDENTROPY",
            reply.credited_bytes,
            reply.entropy_avail
        );
    }
    tracing::debug!(
        credited = reply.credited_bytes,
        entropy_avail = reply.entropy_avail,
        "guest RNG seeded"
    );
    Ok(())
}

/// The kernel command line: serial console, reboot on panic (the VMM then
/// exits and the shim notices), then the configured extra parameters.
/// Nothing secret: the guest's containers read it in /proc/cmdline, and it
/// is in QEMU's argv on the host. The RNG seed goes over vsock instead
/// ([`seed_guest_rng`]).
fn kernel_cmdline(opts: &VmOptions) -> String {
    let mut params = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
    params.push(if opts.debug { "clh.debug" } else { "quiet" }.to_string());
    params.extend(opts.extra_kernel_params.iter().cloned());
    params.join(" ")
}

/// 64 random bytes (512 bits, twice the kernel pool's 256), read from
/// /dev/urandom, which is the getrandom(2) pool without a new dependency.
fn random_seed() -> anyhow::Result<[u8; 64]> {
    let mut bytes = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the guest RNG seed")?;
    Ok(bytes)
}

/// Refuses ids that could escape `root` or make unwieldy paths: the
/// protocol's one id rule ([`clh_agent_protocol::check_id`]).
pub fn validate_id(id: &str) -> anyhow::Result<()> {
    clh_agent_protocol::check_id(id).with_context(|| format!("invalid sandbox id {id:?}"))
}

fn persist_state(dir: &Path, pids: &[u32]) -> anyhow::Result<()> {
    let state = PersistedState {
        processes: pids
            .iter()
            .map(|&pid| PersistedProcess {
                pid,
                cmdline: std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            })
            .collect(),
    };
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let bytes = serde_json::to_vec(&state)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(&bytes))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes the sockets the VMM and its helpers bound directly in `dir`
/// owner-only (0600), as the shim's own files are. They bind with the
/// shim's umask (077), so they are at most 0700 already, and `dir` is 0700;
/// this makes their mode say so on its own. Only `dir`'s own entries:
/// `shared/` and `private/` are the guest's view and are never walked.
fn restrict_sockets(dir: &Path) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        // file_type() does not follow links: a symlink is left alone.
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let path = entry.path();
            std::fs::set_permissions(&path, Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} owner-only", path.display()))?;
        }
    }
    Ok(())
}

/// After a shim crash: SIGKILLs the processes recorded in
/// `root/<id>/state.json` that are still the ones we started (same command
/// line), then removes the directory. A missing directory is not an error.
pub fn cleanup_leftovers(root: &Path, id: &str) -> anyhow::Result<()> {
    validate_id(id)?;
    let dir = root.join(id);
    if !dir.exists() {
        return Ok(());
    }
    let state: Option<PersistedState> = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    for process in state.map(|s| s.processes).unwrap_or_default() {
        let current = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
        if process.cmdline.is_empty() || current != process.cmdline {
            continue;
        }
        let Ok(pid) = i32::try_from(process.pid) else {
            continue;
        };
        tracing::info!(pid, "killing a leftover VM process");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    remove_vm_dir(&dir)
}

/// After a shim crash, for one of a pod's containers: unmounts its rootfs
/// and bind mounts under `root/<sandbox_id>/private/<id>/` (not following
/// links) and removes the directory, without touching the rest of the VM.
pub fn cleanup_container_leftovers(root: &Path, sandbox_id: &str, id: &str) -> anyhow::Result<()> {
    use nix::mount::{umount2, MntFlags};
    validate_id(sandbox_id)?;
    validate_id(id)?;
    let dir = private_dir(&root.join(sandbox_id)).join(id);
    let mut targets = vec![dir.join("rootfs")];
    if let Ok(entries) = std::fs::read_dir(dir.join("mounts")) {
        targets.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    let flags = MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH;
    for target in &targets {
        while umount2(target, flags).is_ok() {}
    }
    for target in targets.iter().skip(1) {
        let _ = std::fs::remove_file(target).or_else(|_| std::fs::remove_dir(target));
    }
    remove_container_dir(&root.join(sandbox_id), id)
}

/// The tails of the guest console, the backend's logs and virtiofsd's
/// log, for a start error.
fn failure_report(dir: &Path, backend: Backend) -> String {
    let mut logs = vec![("guest console", dir.join("console.log"))];
    logs.extend(backend.log_files(dir));
    logs.push(("virtiofsd log", dir.join("virtiofsd.log")));
    let mut report = String::new();
    for (what, path) in logs {
        let tail = clh_hypervisor::process::log_tail(&path, LOG_TAIL_LINES);
        if !tail.trim().is_empty() {
            report.push_str(&format!(
                "\n--- last lines of the {what} ({}) ---\n{tail}",
                path.display()
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule itself is tested in clh-agent-protocol; here, that the VM
    /// layer refuses a bad sandbox id before touching the disk.
    #[tokio::test]
    async fn a_bad_sandbox_id_is_refused_before_anything_is_created() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["..", "../x", "a/b"] {
            let err = cleanup_leftovers(root.path(), bad).unwrap_err();
            assert!(format!("{err:#}").contains("invalid sandbox id"), "{err:#}");
            let Err(err) = PodVm::start(bad, root.path(), &test_options()).await else {
                panic!("{bad:?} accepted");
            };
            assert!(format!("{err:#}").contains("invalid sandbox id"), "{err:#}");
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_root_too_long_for_sockets_is_refused() {
        let root = PathBuf::from(format!("/tmp/{}", "r".repeat(90)));
        let Err(err) = PodVm::start("id", &root, &test_options()).await else {
            panic!("started");
        };
        assert!(format!("{err:#}").contains("shorter state root"), "{err:#}");
        assert!(!root.exists());
    }

    const FAKE_CH_LINE: &str = "fake-ch: error booting VM: no KVM here";

    /// A stand-in `cloud-hypervisor` in `dir` that prints [`FAKE_CH_LINE`]
    /// on stderr and exits 1, as CH does when it cannot start. Written by
    /// a child shell, so no thread of this process holds it open for
    /// writing while another forks (ETXTBSY at exec).
    fn fake_ch(dir: &Path) -> PathBuf {
        let path = dir.join("cloud-hypervisor");
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"printf '#!/bin/sh\necho "%s" >&2\nexit 1\n' "$2" > "$1" && chmod 755 "$1""#)
            .arg("sh")
            .arg(&path)
            .arg(FAKE_CH_LINE)
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    /// Issue 10: the report of a Cloud Hypervisor start failure quotes
    /// CH's own log (`vmm.log`, named by the backend, not by this file).
    #[tokio::test]
    async fn a_cloud_hypervisor_failure_report_quotes_its_vmm_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = test_options();
        opts.backend = Backend::CloudHypervisor;
        opts.binaries.cloud_hypervisor = fake_ch(dir.path());
        let spec = VmSpec {
            id: "t".into(),
            dir: dir.path().to_path_buf(),
            vcpus: 1,
            memory_mib: 128,
            max: None,
            kernel: dir.path().join("vmlinux"),
            initramfs: dir.path().join("initrd"),
            cmdline: String::new(),
            shared_fs: None,
            console_log: dir.path().join("console.log"),
            console_log_max_bytes: opts.console_log_max_bytes,
            start_timeout: Duration::from_secs(10),
        };
        let mut hypervisor = new_backend(opts.backend, &opts.binaries);
        assert!(hypervisor.start(&spec).await.is_err());
        let report = failure_report(dir.path(), opts.backend);
        assert!(report.contains(FAKE_CH_LINE), "{report}");
        let vmm_log = dir.path().join("vmm.log").display().to_string();
        assert!(report.contains(&format!("VMM log ({vmm_log})")), "{report}");
    }

    /// The same through [`PodVm::start`], with the real virtiofsd: the
    /// start error quotes CH's log and nothing is left behind.
    #[tokio::test]
    async fn a_pod_vm_whose_cloud_hypervisor_fails_quotes_its_log() {
        let virtiofsd = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("virtiofsd"))
                .find(|p| p.is_file())
        });
        let Some(virtiofsd) = virtiofsd.filter(|_| nix::unistd::geteuid().is_root()) else {
            clh_test_skip::skip("needs root and virtiofsd on PATH");
            return;
        };
        let bin = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut opts = test_options();
        opts.backend = Backend::CloudHypervisor;
        opts.binaries.cloud_hypervisor = fake_ch(bin.path());
        opts.binaries.virtiofsd = virtiofsd;
        opts.vmm_start_timeout = Duration::from_secs(10);
        let Err(err) = PodVm::start("pod", root.path(), &opts).await else {
            panic!("the fake Cloud Hypervisor started a VM");
        };
        let err = format!("{err:#}");
        assert!(err.contains("the VMM did not start"), "{err}");
        assert!(err.contains("last lines of the VMM log"), "{err}");
        assert!(err.contains(FAKE_CH_LINE), "{err}");
        assert!(!root.path().join("pod").exists());
    }

    /// Polls (bounded) until `/proc/<pid>/cmdline` starts with `prefix`.
    fn wait_for_cmdline(pid: u32, prefix: &[u8]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .starts_with(prefix)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never exec'd"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn cleanup_kills_only_processes_with_the_recorded_command_line() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pod");
        std::fs::create_dir(&dir).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("999")
            .spawn()
            .unwrap();
        // Right after spawn the child may not have exec'd yet, and its
        // cmdline would still be this test binary's.
        for child in [&sleeper, &bystander] {
            wait_for_cmdline(child.id(), b"sleep\0");
        }
        persist_state(&dir, &[sleeper.id()]).unwrap();
        // The bystander is recorded with someone else's command line, as a
        // recycled pid would be.
        let mut state: PersistedState =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        state.processes.push(PersistedProcess {
            pid: bystander.id(),
            cmdline: b"qemu-system-x86_64\0".to_vec(),
        });
        std::fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();

        cleanup_leftovers(root.path(), "pod").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = sleeper.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                sleeper.kill().unwrap();
                bystander.kill().unwrap();
                panic!("cleanup_leftovers did not kill the recorded process");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success());
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "bystander was killed"
        );
        assert!(!dir.exists());
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }

    /// Set in the child of the test below: the state root to clean up.
    const LOCKED_ROOT_ENV: &str = "CLH_TEST_LOCKED_CLEANUP_ROOT";

    /// Hole 9: a VM directory whose mounts cannot be detached (a mount
    /// namespace owned by a user namespace inherits them locked: umount2
    /// answers EINVAL, as if nothing were mounted). The crash cleanup runs
    /// there, in a child; it must fail naming the mounts, and the canary
    /// file in a volume mounted below must survive (remove_dir_all deleted
    /// it through the mount).
    #[test]
    fn cleanup_never_deletes_through_a_mount_it_cannot_detach() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounts need root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pod");
        // The private tree, a mount as make_export makes it, with a volume;
        // no read-only export beside it, whose EROFS could stop a careless
        // removal before it reached the volume.
        let private = private_dir(&dir);
        let volume = private.join("c1/mounts/0");
        std::fs::create_dir_all(&volume).unwrap();
        let none = None::<&str>;
        let bind = nix::mount::MsFlags::MS_BIND;
        nix::mount::mount(Some(&private), &private, none, bind, none).unwrap();
        let tmpfs = nix::mount::MsFlags::empty();
        nix::mount::mount(Some("tmpfs"), &volume, Some("tmpfs"), tmpfs, none).unwrap();
        std::fs::write(volume.join("canary"), "host data").unwrap();
        let child = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "vm::tests::locked_cleanup_child", "--nocapture"])
            .env(LOCKED_ROOT_ENV, root.path())
            .output()
            .unwrap();
        let canary = std::fs::read_to_string(volume.join("canary"));
        let cleaned = crate::shared_mount::remove_vm_dir(&dir);
        let output = String::from_utf8_lossy(&child.stdout).into_owned();
        assert!(child.status.success(), "the child failed: {child:?}");
        assert_eq!(canary.unwrap(), "host data", "deleted through a mount");
        assert!(output.contains("CLEANUP-REFUSED"), "{output}");
        assert!(output.contains("still mounted there"), "{output}");
        assert!(output.contains(&private.display().to_string()), "{output}");
        cleaned.unwrap();
        assert!(!dir.exists());
    }

    /// The child of the test above, in its user and mount namespaces;
    /// without the variable (a plain test run) it does nothing.
    #[test]
    fn locked_cleanup_child() {
        let Some(root) = std::env::var_os(LOCKED_ROOT_ENV) else {
            return;
        };
        match cleanup_leftovers(Path::new(&root), "pod") {
            Ok(()) => println!("CLEANUP-SUCCEEDED"),
            Err(e) => println!("CLEANUP-REFUSED: {e:#}"),
        }
    }

    #[test]
    fn sockets_in_the_vm_dir_become_owner_only_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let _ours = std::os::unix::net::UnixListener::bind(root.path().join("a.sock")).unwrap();
        let _theirs =
            std::os::unix::net::UnixListener::bind(outside.path().join("b.sock")).unwrap();
        for dir in [root.path(), outside.path()] {
            let sock = std::fs::read_dir(dir)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            std::fs::set_permissions(&sock, Permissions::from_mode(0o777)).unwrap();
        }
        std::os::unix::fs::symlink(outside.path().join("b.sock"), root.path().join("link"))
            .unwrap();
        restrict_sockets(root.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root.path().join("a.sock")), 0o600);
        assert_eq!(mode(&outside.path().join("b.sock")), 0o777);
    }

    #[test]
    fn state_json_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        persist_state(dir.path(), &[std::process::id()]).unwrap();
        let meta = std::fs::metadata(dir.path().join("state.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o077, 0);
    }

    fn test_options() -> VmOptions {
        VmOptions {
            backend: Backend::Qemu,
            binaries: Binaries {
                cloud_hypervisor: "ch".into(),
                qemu: "q".into(),
                vhost_device_vsock: "v".into(),
                virtiofsd: "f".into(),
            },
            kernel: "k".into(),
            initramfs: "i".into(),
            vcpus: 1,
            memory_mib: 256,
            max: None,
            extra_kernel_params: vec!["foo=1".into()],
            debug: false,
            console_log_max_bytes: clh_hypervisor::console_log::DEFAULT_MAX_BYTES,
            vmm_start_timeout: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_command_line_carries_no_seed_only_the_extras() {
        let opts = test_options();
        assert_ne!(random_seed().unwrap(), random_seed().unwrap());
        assert_eq!(kernel_cmdline(&opts), "console=ttyS0 panic=-1 quiet foo=1");
    }
}
