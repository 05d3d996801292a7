//! Steps 1 to 6 of [`PodVm::start`](super::PodVm::start) (the module doc
//! of `vm`): what each made is kept in [`Parts`], so that a failure
//! undoes exactly that ([`undo`]), and each step's span goes into the
//! start's [`StartTimeline`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clh_agent_client::AgentClient;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{Hypervisor, SharedFs};
use clh_network::PodNetwork;

use super::leftovers::persist_state;
use super::net::{intercept_loopback, nics, queue_pairs, unwire};
use super::steps::{
    check_guest_image, make_vm_dir, restrict_sockets, seed_guest_rng, vm_spec, with_descendants,
};
use super::{
    is_running, template, timeline, validate_id, StartStep, StartTimeline, VmOptions, SHARED_FS_TAG,
};
use crate::pod_cgroup::PodCgroup;
use crate::shared_mount::{export_dir, make_export, remove_vm_dir};

/// What a start made so far, undone if a later step fails.
#[derive(Default)]
pub(super) struct Parts {
    pub(super) cgroup: Option<PodCgroup>,
    pub(super) dir: Option<PathBuf>,
    pub(super) network: Option<PodNetwork>,
    /// The port-forward interceptor's listener in the pod's namespace.
    pub(super) forward: Option<std::net::TcpListener>,
    pub(super) virtiofsd: Option<Virtiofsd>,
    pub(super) hypervisor: Option<Box<dyn Hypervisor>>,
    pub(super) timeline: StartTimeline,
}

/// Steps 1 to 6; what they made is in `parts`. Each
/// step's span goes into `parts.timeline`.
pub(super) async fn start_in(
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

    let mut spec = vm_spec(id, &dir, opts);
    spec.shared_fs = Some(SharedFs {
        socket: fs_socket,
        tag: SHARED_FS_TAG.to_string(),
    });
    spec.netns = network.as_ref().map(|n| n.netns.clone());
    spec.nics = network.iter().flat_map(nics).collect();
    let t = Instant::now();
    if let Some(store) = &opts.templates {
        spec.restore_from = template::restore_source(store, opts, &spec).await;
    }
    if spec.restore_from.is_some() {
        parts.timeline.record("template", t);
    }
    let t = Instant::now();
    let hypervisor = parts
        .hypervisor
        .insert(opts.hypervisors.make(opts.backend, &opts.binaries));
    let mut started = hypervisor.start(&spec).await;
    // A failed start has stopped what it spawned (Hypervisor::start).
    if let (Err(e), Some(snapshot)) = (&started, spec.restore_from.take()) {
        tracing::warn!(
            template = %snapshot.display(),
            error = %e,
            "restoring the VM from its template failed; discarding the template and booting"
        );
        template::discard(&snapshot);
        *hypervisor = opts.hypervisors.make(opts.backend, &opts.binaries);
        started = hypervisor.start(&spec).await;
    }
    started.map_err(StartStep::Vmm)?;
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
        let agent = agent.map(|a| a.with_call_timeout(opts.agent_call_timeout));
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
    let t = Instant::now();
    let identity = agent.set_identity(opts.hostname.as_deref()).await;
    identity.map_err(StartStep::Agent)?;
    parts.timeline.record("identity", t);
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
pub(super) async fn undo(parts: Parts, timeout: Duration) {
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
