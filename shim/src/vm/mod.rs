//! One pod's VM, the object the service talks to: it owns the state
//! directory, virtiofsd, the hypervisor, the pod cgroup, the watchers and
//! the one typed agent client, and is started and stopped as one unit.
//!
//! [`PodVm::start`] is the whole pod start on the host, in order:
//! 1. refuse what cannot work (id, socket path lengths, guest image);
//! 2. create the pod cgroup and `root/<id>/` (0700), and the shared
//!    directory in it;
//! 3. at once, as neither needs the other: wire each interface of the
//!    pod's network namespace to a tap there (clh-network), when the pod
//!    has one, and start virtiofsd on the shared directory;
//! 4. start the VMM through the backend the factory makes, in the pod's
//!    network namespace with a NIC per tap;
//! 5. record the pids and the wiring (`state.json`, for
//!    [`cleanup_leftovers`]), make the sockets owner-only, move every host
//!    process into the pod cgroup;
//! 6. connect to the agent (retrying while the guest boots), seed the
//!    guest's RNG and configure its network over that connection;
//! 7. watch the VMM and virtiofsd, and health-check the agent: either
//!    process exiting, or the agent failing a check, kills the pod.
//!
//! Steps 1 to 6 are `start.rs`, each timed (`timeline.rs`).
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
mod start;
mod steps;
mod template;
#[cfg(test)]
mod tests;
pub mod timeline;

use std::fs::Permissions;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clh_agent_client::AgentClient;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{Backend, Binaries, Hypervisor, HypervisorFactory, Nic, VmSize};
use clh_network::PodNetwork;
use start::{start_in, undo, Parts};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clh_agent_protocol::SHARED_FS_TAG;
pub(crate) use error::chain;
pub use error::{StartStep, VmStartError};
pub use health::HealthCheck;
pub use leftovers::{cleanup_container_leftovers, cleanup_leftovers};
pub use template::make_ahead as make_template;
pub use timeline::StartTimeline;

use crate::pod_cgroup::PodCgroup;
use crate::shared_mount::remove_vm_dir;
use crate::writable_shares::WritableShares;
use net::unwire;
pub(crate) use steps::is_running;
use steps::with_descendants;
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
    /// The guest's hostname (the pod's), set by the agent (SetIdentity),
    /// never on the kernel command line: templates are shared by pods of
    /// every name. `None`: the agent's default.
    pub hostname: Option<String>,
    pub debug: bool,
    /// Cap of the guest console log (`console.log` and `console.log.1`).
    pub console_log_max_bytes: u64,
    /// The guest reports the memory it frees (virtio-balloon).
    pub free_page_reporting: bool,
    /// QEMU TCG's translated-code buffer in MiB; 0: QEMU's default.
    pub tcg_tb_size_mib: u32,
    /// Where QEMU templates are kept; `None`: every VM boots.
    pub templates: Option<PathBuf>,
    pub vmm_start_timeout: Duration,
    pub agent_timeout: Duration,
    /// Each request to the running agent, the long polls aside.
    pub agent_call_timeout: Duration,
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

/// Refuses ids that could escape `root` or make unwieldy paths: the
/// protocol's one id rule ([`clh_agent_protocol::check_id`]).
pub fn validate_id(id: &str) -> Result<(), StartStep> {
    clh_agent_protocol::check_id(id).map_err(|source| StartStep::InvalidId {
        id: id.to_string(),
        source,
    })
}
