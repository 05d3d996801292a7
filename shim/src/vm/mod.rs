//! One pod's VM, the object the service talks to: it owns the state
//! directory, virtiofsd, the hypervisor, the pod cgroup, the watchers and
//! the one typed agent client, and is started and stopped as one unit.
//!
//! [`PodVm::start`] is the whole pod start on the host, in order:
//! 1. refuse what cannot work (id, socket path lengths, guest image);
//! 2. create the pod cgroup and `root/<id>/` (0700);
//! 3. wire each interface of the pod's network namespace to a tap there
//!    (clh-network), when the pod has one;
//! 4. make the shared directory and start virtiofsd on it;
//! 5. start the VMM through the backend the factory makes, in the pod's
//!    network namespace with a NIC per tap;
//! 6. record the pids and the wiring (`state.json`, for
//!    [`cleanup_leftovers`]), make the sockets owner-only, move every host
//!    process into the pod cgroup;
//! 7. connect to the agent (retrying while the guest boots), seed the
//!    guest's RNG and configure its network over that connection;
//! 8. watch the VMM and virtiofsd, and health-check the agent: either
//!    process exiting, or the agent failing a check, kills the pod.
//!
//! On failure at any step everything made so far is undone, and the error
//! ([`VmStartError`]) quotes the guest console, VMM and virtiofsd logs.
//!
//! Layout of `root/<id>/`: `private/` (where the host mounts) and `shared/`
//! (its read-only export, served by virtiofsd; see shared_mount.rs),
//! `staging/` (where recursive binds are trimmed; submounts.rs),
//! `virtiofsd.sock`, the backend's sockets and logs, `console.log`, and
//! `state.json`. It is removed without ever crossing a mount
//! (remove_tree.rs).

mod error;
mod forward;
mod health;
mod leftovers;
mod net;
mod report;
mod steps;
#[cfg(test)]
mod tests;
pub mod timeline;

use std::fs::Permissions;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clh_agent_client::AgentClient;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{
    Backend, Binaries, Hypervisor, HypervisorFactory, Nic, SharedFs, VmSize, VmSpec,
};
use clh_network::PodNetwork;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clh_agent_protocol::SHARED_FS_TAG;
pub(crate) use error::chain;
pub use error::{StartStep, VmStartError};
pub use health::HealthCheck;
pub use leftovers::{cleanup_container_leftovers, cleanup_leftovers};
pub use timeline::StartTimeline;

use crate::pod_cgroup::PodCgroup;
use crate::shared_mount::{export_dir, make_export, remove_vm_dir};
use crate::writable_shares::WritableShares;
use leftovers::persist_state;
use net::{intercept_loopback, nics, queue_pairs, unwire};
pub(crate) use steps::is_running;
use steps::{
    check_guest_image, kernel_cmdline, make_vm_dir, restrict_sockets, seed_guest_rng,
    with_descendants,
};
#[cfg(test)]
pub(crate) use tests::guest_image as test_guest_image;

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub backend: Backend,
    /// Makes the backend's [`Hypervisor`]; a fake in unit tests.
    pub hypervisors: HypervisorFactory,
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
    /// The running pod's agent health check.
    pub health: HealthCheck,
    /// The pod's host cgroup (the spec's `linux.cgroupsPath`) for the VMM,
    /// its helpers and virtiofsd; `None`: they stay in the shim's.
    pub cgroups_path: Option<String>,
    /// The pod's network namespace (CNI's): its interfaces become the
    /// VM's NICs. `None`: the VM has no NIC.
    pub netns: Option<PathBuf>,
}

/// The processes of a running VM. Shared with the VMM-exit watcher, and
/// taken back whole when the VM stops.
struct Machine {
    virtiofsd: Virtiofsd,
    hypervisor: Box<dyn Hypervisor>,
}

impl Machine {
    fn pids(&self) -> Vec<u32> {
        let mut pids = self.hypervisor.pids();
        if self.virtiofsd.exited().is_none() {
            pids.push(self.virtiofsd.pid());
        }
        pids
    }
}

pub struct PodVm {
    id: String,
    dir: PathBuf,
    vsock: PathBuf,
    agent: AgentClient,
    /// Turns true when the VMM or virtiofsd has exited, or the agent
    /// failed its health check (and the VMM was killed).
    dead: watch::Receiver<bool>,
    /// Host paths the guest can write through virtio-fs: never synced.
    writable: Arc<WritableShares>,
    /// `None` once stopped.
    machine: Mutex<Option<Arc<Machine>>>,
    /// The VM's current size.
    size: Mutex<VmSize>,
    /// The host cgroup holding the VMM, its helpers and virtiofsd.
    cgroup: Mutex<Option<PodCgroup>>,
    /// The pod's interfaces wired to the VM's taps; unwired at stop.
    network: Mutex<Option<PodNetwork>>,
    /// Watchers (VMM exit, and the service's, e.g. its OOM loop), aborted
    /// at stop.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop_timeout: Duration,
    /// Where its start spent its time.
    timeline: StartTimeline,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a start made so far, undone if a later step fails.
#[derive(Default)]
struct Parts {
    cgroup: Option<PodCgroup>,
    dir: Option<PathBuf>,
    network: Option<PodNetwork>,
    /// The port-forward interceptor's listener in the pod's namespace.
    forward: Option<std::net::TcpListener>,
    virtiofsd: Option<Virtiofsd>,
    hypervisor: Option<Box<dyn Hypervisor>>,
    timeline: StartTimeline,
}

impl PodVm {
    /// Starts the pod VM `id` under `root` (the steps are in the module
    /// doc). On failure nothing is left: no process, directory or cgroup.
    pub async fn start(
        id: &str,
        root: &Path,
        opts: &VmOptions,
    ) -> Result<Arc<PodVm>, VmStartError> {
        let mut parts = Parts::default();
        match start_in(id, root, opts, &mut parts).await {
            Ok(agent) => Ok(Self::running(id, opts, parts, agent)),
            Err(step) => {
                let report = match &parts.dir {
                    Some(dir) => report::failure_report(dir, opts.backend),
                    None => String::new(),
                };
                undo(parts, opts.stop_timeout).await;
                Err(VmStartError {
                    id: id.to_string(),
                    step,
                    report,
                })
            }
        }
    }

    fn running(id: &str, opts: &VmOptions, parts: Parts, agent: AgentClient) -> Arc<PodVm> {
        let (Some(dir), Some(virtiofsd), Some(hypervisor)) =
            (parts.dir, parts.virtiofsd, parts.hypervisor)
        else {
            unreachable!("start_in fills every part before it succeeds");
        };
        let vsock = hypervisor.vsock_socket();
        let forward = parts.forward.map(tokio::net::TcpListener::from_std);
        let machine = Arc::new(Machine {
            virtiofsd,
            hypervisor,
        });
        let (dead_tx, dead) = watch::channel(false);
        let vm = Arc::new(PodVm {
            id: id.to_string(),
            dir,
            vsock,
            agent,
            dead,
            writable: Arc::default(),
            machine: Mutex::new(Some(machine.clone())),
            size: Mutex::new(VmSize {
                vcpus: opts.vcpus,
                memory_mib: opts.memory_mib,
            }),
            cgroup: Mutex::new(parts.cgroup),
            network: Mutex::new(parts.network),
            tasks: Mutex::default(),
            stop_timeout: opts.stop_timeout,
            timeline: parts.timeline,
        });
        match forward {
            Some(Ok(listener)) => {
                let served = forward::serve(listener, vm.vsock.clone());
                vm.track(tokio::spawn(served));
            }
            Some(Err(e)) => tracing::warn!(error = %e, "port forwarding is off for this pod"),
            None => {}
        }
        let sid = id.to_string();
        let unhealthy = health::until_unhealthy(vm.agent.clone(), opts.health);
        // The VM is dead when its VMM exits, and also when virtiofsd does:
        // the guest's root file systems and volumes are gone, and its I/O
        // would hang for ever (REL-VFS-01); and when its agent stops
        // answering (REL-AGENT-01, REL-PANIC-01). In those two cases the
        // VMM is killed, so that what the pod reports (every container
        // exited) is true.
        // Either way every container of the pod exits and the pause
        // stand-in ends; the stop that follows takes the rest down.
        vm.track(tokio::spawn(async move {
            let how = tokio::select! {
                how = machine.hypervisor.wait_exit() => format!("the VMM exited ({how})"),
                how = machine.virtiofsd.wait_exit() => {
                    kill_vmm(&machine);
                    format!("virtiofsd exited ({how}): the guest lost its files; the VMM was killed")
                }
                why = unhealthy => {
                    kill_vmm(&machine);
                    format!("{why}; the VMM was killed")
                }
            };
            tracing::error!(id = sid, how, "the pod's VM is dead");
            let _ = dead_tx.send(true);
        }));
        vm
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The one agent client: every call to the guest goes through it.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid-vsock socket: agent (port 1024) and stdio (port 1025).
    pub fn vsock_socket(&self) -> &Path {
        &self.vsock
    }

    pub fn writable(&self) -> &Arc<WritableShares> {
        &self.writable
    }

    /// Whether the VMM has exited.
    pub fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Resolves once the VMM has exited (at once if it has): true; or once
    /// the VM was stopped and its watcher is gone: false.
    pub async fn died(&self) -> bool {
        let mut dead = self.dead.clone();
        let died = dead.wait_for(|d| *d).await.is_ok();
        died
    }

    pub fn boot_to_agent(&self) -> Duration {
        self.timeline.boot_to_agent()
    }

    /// Each step of its start (`timeline.rs`).
    pub fn start_timeline(&self) -> &StartTimeline {
        &self.timeline
    }

    /// The pids of the VMM, its helpers and virtiofsd.
    pub fn pids(&self) -> Vec<u32> {
        locked(&self.machine)
            .as_ref()
            .map(|m| m.pids())
            .unwrap_or_default()
    }

    /// The VM's host processes by role, each with what it forked: `vmm`,
    /// `vmm_helper` (the backend's other processes: vhost-device-vsock) and
    /// `virtiofsd` (its sandboxed worker included). For metrics.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        let (vmm, fs) = match locked(&self.machine).as_ref() {
            Some(m) => (
                m.hypervisor.pids(),
                m.virtiofsd.exited().is_none().then(|| m.virtiofsd.pid()),
            ),
            None => return Vec::new(),
        };
        let roots = vmm
            .into_iter()
            .enumerate()
            .map(|(i, pid)| (if i == 0 { "vmm" } else { "vmm_helper" }, pid))
            .chain(fs.map(|pid| ("virtiofsd", pid)));
        let mut all: Vec<(&'static str, u32)> = Vec::new();
        for (role, pid) in roots {
            for p in with_descendants(vec![pid]) {
                if !all.iter().any(|(_, q)| *q == p) {
                    all.push((role, p));
                }
            }
        }
        all
    }

    /// The VMM's pid, which stands for the pod's pause process.
    pub fn vmm_pid(&self) -> u32 {
        self.pids().first().copied().unwrap_or_default()
    }

    pub fn size(&self) -> VmSize {
        *locked(&self.size)
    }

    /// Runs `task` until the VM stops.
    pub fn track(&self, task: JoinHandle<()>) {
        locked(&self.tasks).push(task);
    }

    /// Grows the VM towards `target` and onlines what was added; the size
    /// in effect. A backend that cannot grow (QEMU) answers
    /// [`clh_hypervisor::Error::Unsupported`] and the VM stays as it is.
    pub async fn grow(&self, target: VmSize) -> Result<VmSize, GrowError> {
        let machine = locked(&self.machine).clone();
        let Some(machine) = machine else {
            return Ok(self.size());
        };
        let now = machine
            .hypervisor
            .resize(target)
            .await
            .map_err(GrowError::Resize)?;
        *locked(&self.size) = now;
        // Linux leaves hot-added CPUs offline; the agent onlines them.
        self.agent
            .online_resources()
            .await
            .map_err(GrowError::Online)?;
        Ok(now)
    }

    /// Stops the watchers, the VM and virtiofsd, removes the directory and
    /// the pod cgroup. Idempotent.
    pub async fn stop(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        let tasks: Vec<_> = locked(&self.tasks).drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let machine = locked(&self.machine).take();
        let stopped = match machine.map(Arc::try_unwrap) {
            None => Ok(()),
            Some(Ok(mut m)) => {
                let vm = m.hypervisor.stop(self.stop_timeout).await;
                let fs = m.virtiofsd.stop(self.stop_timeout).await;
                let rm = remove_vm_dir(&self.dir);
                tracing::info!(id = %self.id, "VM stopped");
                vm.context("stopping the VM")
                    .and(fs.context("stopping virtiofsd"))
                    .and(rm)
            }
            Some(Err(_)) => Err(anyhow::anyhow!(
                "internal error: VM {} is still shared after its watchers ended",
                self.id
            )),
        };
        let network = locked(&self.network).take();
        let unwired = unwire(network).await;
        let cgroup = locked(&self.cgroup).take();
        if let Some(cg) = cgroup {
            cg.destroy(self.stop_timeout).await?;
        }
        stopped.and(unwired)
    }
}

/// SIGKILLs the VMM and its helpers. They are the backend's unreaped
/// children, so their pids cannot have been reused; the backend's own
/// exit watcher reaps them.
fn kill_vmm(machine: &Machine) {
    use nix::sys::signal::{kill, SIGKILL};
    for pid in machine.hypervisor.pids() {
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        if let Err(e) = kill(nix::unistd::Pid::from_raw(pid), SIGKILL) {
            tracing::warn!(pid, error = %e, "cannot kill a VMM process");
        }
    }
}

/// Why a running VM did not grow.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("cannot resize the VM")]
    Resize(#[source] clh_hypervisor::Error),
    #[error("the guest did not online its new resources")]
    Online(#[source] clh_agent_client::Error),
}

/// Steps 1 to 6 of the module doc; what they made is in `parts`. Each
/// step's span goes into `parts.timeline`.
async fn start_in(
    id: &str,
    root: &Path,
    opts: &VmOptions,
    parts: &mut Parts,
) -> Result<AgentClient, StartStep> {
    let t = Instant::now();
    validate_id(id)?;
    let dir = root.join(id);
    clh_hypervisor::check_vm_dir(&dir).map_err(StartStep::StateDir)?;
    check_guest_image(opts)?;
    parts.timeline.record("checks", t);
    let t = Instant::now();
    if let Some(path) = opts.cgroups_path.as_deref().filter(|p| !p.is_empty()) {
        parts.cgroup = Some(PodCgroup::create(path).map_err(StartStep::Cgroup)?);
        parts.timeline.record("cgroup", t);
    }
    let t = Instant::now();
    make_vm_dir(root, &dir)?;
    parts.dir = Some(dir.clone());
    make_export(&dir).map_err(|e| StartStep::SharedDir(e.into()))?;
    parts.timeline.record("state_dir", t);

    // The pod's network and virtiofsd need nothing of each other: wired
    // while virtiofsd starts.
    let wire = async {
        let netns = opts.netns.clone()?;
        let t = Instant::now();
        let queues = queue_pairs(opts.vcpus);
        let path = netns.clone();
        let wired = tokio::task::spawn_blocking(move || clh_network::wire(&path, queues)).await;
        let wired = wired.unwrap_or_else(|_| {
            Err(clh_network::NetError::Panicked {
                path: netns.clone(),
            })
        });
        let forward = match &wired {
            Ok(_) => intercept_loopback(Some(netns)).await,
            Err(_) => None,
        };
        Some((wired, forward, t))
    };
    let fs_socket = dir.join(clh_hypervisor::virtiofsd::SOCKET_NAME);
    let start_fs = async {
        let t = Instant::now();
        let started = Virtiofsd::start(
            &opts.binaries.virtiofsd,
            &export_dir(&dir),
            &fs_socket,
            &dir.join("virtiofsd.log"),
            opts.vmm_start_timeout,
        )
        .await;
        (started, t)
    };
    let (wired, (started, fs_began)) = tokio::join!(wire, start_fs);
    // Both results are kept before either error is returned, so that a
    // failed start undoes what the other branch made.
    let started = started.map(|fs| parts.virtiofsd.insert(fs).socket().to_path_buf());
    parts.timeline.record("virtiofsd", fs_began);
    if let Some((wired, forward, began)) = wired {
        parts.network = Some(wired.map_err(StartStep::Network)?);
        parts.forward = forward;
        parts.timeline.record("network", began);
    }
    let fs_socket = started.map_err(StartStep::Virtiofsd)?;
    let network = parts.network.clone().filter(|n| !n.links.is_empty());

    let spec = VmSpec {
        id: id.to_string(),
        dir: dir.clone(),
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        max: opts.max,
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        cmdline: kernel_cmdline(opts),
        shared_fs: Some(SharedFs {
            socket: fs_socket,
            tag: SHARED_FS_TAG.to_string(),
        }),
        console_log: dir.join("console.log"),
        console_log_max_bytes: opts.console_log_max_bytes,
        start_timeout: opts.vmm_start_timeout,
        netns: network.as_ref().map(|n| n.netns.clone()),
        nics: network.iter().flat_map(nics).collect(),
    };
    let t = Instant::now();
    let hypervisor = parts
        .hypervisor
        .insert(opts.hypervisors.make(opts.backend, &opts.binaries));
    hypervisor.start(&spec).await.map_err(StartStep::Vmm)?;
    parts.timeline.record(timeline::VMM, t);

    let t = Instant::now();
    let mut pids = hypervisor.pids();
    pids.extend(parts.virtiofsd.as_ref().map(Virtiofsd::pid));
    persist_state(&dir, &pids, parts.network.as_ref())?;
    restrict_sockets(&dir)?;
    if let Some(cgroup) = parts.cgroup.as_mut() {
        for pid in with_descendants(pids) {
            match cgroup.add_process(pid) {
                Ok(()) => {}
                // A short-lived helper that exited since it was listed.
                Err(_) if !is_running(pid) => {}
                Err(e) => return Err(StartStep::Cgroup(e)),
            }
        }
    }
    parts.timeline.record("accounting", t);

    let uds = hypervisor.vsock_socket();
    let timeline = &mut parts.timeline;
    let reach_agent = async {
        let deadline = Instant::now() + opts.agent_timeout;
        let t = Instant::now();
        // At most half the agent deadline: a console that never shows the
        // agent's line (another guest image) only delays the attempts.
        if !hypervisor.wait_vsock_ready(opts.agent_timeout / 2).await {
            tracing::warn!("the guest console did not show the agent serving; connecting anyway");
        }
        timeline.record("guest_boot", t);
        let t = Instant::now();
        let left = deadline.saturating_duration_since(Instant::now());
        let agent = AgentClient::connect(&uds, left).await;
        timeline.record("agent_connect", t);
        agent
    };
    let agent = tokio::select! {
        agent = reach_agent => agent.map_err(StartStep::Agent)?,
        how = hypervisor.wait_exit() => return Err(StartStep::VmmExited { how }),
    };
    let t = Instant::now();
    seed_guest_rng(&agent).await?;
    parts.timeline.record("rng_seed", t);
    if let Some(network) = &network {
        let t = Instant::now();
        let config = network.guest_config();
        let configured = agent.configure_network(&config).await;
        configured.map_err(StartStep::GuestNetwork)?;
        parts.timeline.record("guest_network", t);
    }
    Ok(agent)
}

/// Undoes a failed start, last step first.
async fn undo(parts: Parts, timeout: Duration) {
    if let Some(mut hv) = parts.hypervisor {
        if let Err(e) = hv.stop(timeout).await {
            tracing::warn!(error = %e, "stopping the VM after a failed start");
        }
    }
    if let Some(mut fs) = parts.virtiofsd {
        if let Err(e) = fs.stop(timeout).await {
            tracing::warn!(error = %e, "stopping virtiofsd after a failed start");
        }
    }
    if let Err(e) = unwire(parts.network).await {
        tracing::warn!(
            error = format!("{e:#}"),
            "unwiring the pod network after a failed start"
        );
    }
    if let Some(dir) = parts.dir {
        if let Err(e) = remove_vm_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = format!("{e:#}"), "cannot remove VM directory");
        }
    }
    if let Some(cg) = parts.cgroup {
        if let Err(e) = cg.destroy(timeout).await {
            tracing::error!(error = %e, "removing the pod cgroup after a failed start");
        }
    }
}

/// Refuses ids that could escape `root` or make unwieldy paths: the
/// protocol's one id rule ([`clh_agent_protocol::check_id`]).
pub fn validate_id(id: &str) -> Result<(), StartStep> {
    clh_agent_protocol::check_id(id).map_err(|source| StartStep::InvalidId {
        id: id.to_string(),
        source,
    })
}
