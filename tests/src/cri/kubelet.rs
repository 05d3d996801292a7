//! [`Kubelet`]: a private containerd serving the CRI, a [`Cri`] client, and
//! what a kubelet does around the calls (images, pod cgroups and log dirs,
//! cleanup), with leak checks after pods are removed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_cri::v1 as cri;

use super::{ContainerBuilder, Cri, PodBuilder};
use crate::containerd::{ContainerdVersion, PrivateContainerd, CRI_NAMESPACE, SANDBOX_IMAGE};

pub const BUSYBOX: &str = "docker.io/library/busybox:latest";
pub const PAUSE: &str = SANDBOX_IMAGE;

/// Where libcni caches each attachment's result (not configurable through
/// containerd); entries name the sandbox id and must go with the pod.
const CNI_CACHE: &str = "/var/lib/cni/results";

/// How long asynchronous cleanup (a shim exiting after its last delete)
/// may take before what is left counts as leaked.
const SETTLE: Duration = Duration::from_secs(15);

/// How often a condition of the harness is polled.
const POLL: Duration = Duration::from_millis(100);

/// A check of the handler's own leftovers (e.g. a VM shim's state dir,
/// `ctr::state_dir_leaks`), given the running containerd.
pub type LeakCheck = Arc<dyn Fn(&PrivateContainerd) -> Vec<String> + Send + Sync>;
/// What the handler can tell of a failed test (the guests' consoles).
pub type FailureReport = Arc<dyn Fn() -> String + Send + Sync>;

/// What a scenario needs to know about the runtime handler under test.
/// For our shim (cf. `ctr::setup`, which writes its config):
///
/// ```text
/// let s = ctr::setup()?;
/// let state_dir = s.state_dir.clone();
/// let setup = CriSetup {
///     shim_dir: Some(ctr::shim_dir()?),
///     env: vec![("CLH_SHIM_CONFIG".into(), s.config.display().to_string())],
///     extra_leaks: Some(Arc::new(move |_| ctr::state_dir_leaks(&state_dir))),
///     ..CriSetup::new("clh", Path::new(env!("CARGO_TARGET_TMPDIR")))
/// };
/// ```
#[derive(Clone)]
pub struct CriSetup {
    /// The CRI runtime handler (`runc`, `clh`).
    pub handler: String,
    pub version: ContainerdVersion,
    /// Put first on containerd's PATH (where `containerd-shim-clh-v2` is).
    pub shim_dir: Option<PathBuf>,
    /// More environment for containerd and its shims (`CLH_SHIM_CONFIG`).
    pub env: Vec<(String, String)>,
    /// Where the image tarballs are built (`CARGO_TARGET_TMPDIR`).
    pub images_dir: PathBuf,
    /// Deadline of each CRI call, and the base of the scenarios' waits.
    pub timeout: Duration,
    /// Leftovers of the handler itself, checked with the others.
    pub extra_leaks: Option<LeakCheck>,
    /// Printed, with containerd's warnings, when a test fails.
    pub failure_report: Option<FailureReport>,
    /// A node's own containerd config, written (and clh-shim installed
    /// into it) by this: containerd then runs from that file.
    pub node_config: Option<NodeConfigFn>,
}

/// See [`crate::containerd::NodeConfig`].
pub type NodeConfigFn = Arc<dyn Fn(&Path, &str) -> Result<PathBuf> + Send + Sync>;

impl CriSetup {
    /// `handler` on containerd 2.x, without shim dir or extra environment.
    pub fn new(handler: &str, images_dir: &Path) -> Self {
        Self {
            handler: handler.to_owned(),
            version: ContainerdVersion::V2,
            shim_dir: None,
            env: Vec::new(),
            images_dir: images_dir.to_path_buf(),
            timeout: super::CALL_TIMEOUT,
            extra_leaks: None,
            failure_report: None,
            node_config: None,
        }
    }
}

/// A running pod sandbox and the config it was run with.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    /// The pod's cgroup (cgroupfs path).
    pub cgroup: String,
    pub log_dir: PathBuf,
}

/// A minimal kubelet over a private containerd.
pub struct Kubelet {
    cri: Cri,
    ctd: PrivateContainerd,
    setup: CriSetup,
    /// Shim sockets seen while pods ran: none may outlive them.
    sockets: Mutex<BTreeSet<PathBuf>>,
    /// Every pod id run, to look for its leftovers.
    pod_ids: Mutex<Vec<String>>,
    next_uid: AtomicU32,
    /// `finish` was called: a Kubelet dropped without it is a failed test,
    /// whose containerd (and shim) warnings are printed.
    finished: bool,
}

impl Kubelet {
    /// Starts a private containerd for `setup`, imports the pause and
    /// busybox images into the CRI namespace, and waits for the CRI to be
    /// ready.
    pub fn start(setup: &CriSetup) -> Result<Self> {
        let env: Vec<(&str, &str)> = setup
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let ctd = match &setup.node_config {
            Some(node) => PrivateContainerd::start_node(setup.version, &env, node.as_ref())?,
            None => {
                PrivateContainerd::start_with_env(setup.version, setup.shim_dir.as_deref(), &env)?
            }
        };
        for (script, name) in [
            ("build-pause-image.sh", PAUSE),
            ("build-busybox-image.sh", BUSYBOX),
        ] {
            let tar = image_tar(&setup.images_dir, script)?;
            ctd.import_image_in(CRI_NAMESPACE, &tar, name)?;
        }
        let cri = Cri::connect(ctd.address())?.with_timeout(setup.timeout);
        let me = Self {
            cri,
            ctd,
            setup: setup.clone(),
            sockets: Mutex::new(BTreeSet::new()),
            pod_ids: Mutex::new(Vec::new()),
            next_uid: AtomicU32::new(0),
            finished: false,
        };
        me.cri.wait_ready(setup.timeout)?;
        // The CRI plugin must see the imported sandbox image: it would try
        // to pull it (no registry here) otherwise.
        ensure!(
            me.cri.image_status(PAUSE)?.is_some(),
            "the CRI plugin does not see {PAUSE}"
        );
        Ok(me)
    }

    pub fn cri(&self) -> &Cri {
        &self.cri
    }

    pub fn containerd(&self) -> &PrivateContainerd {
        &self.ctd
    }

    /// To kill containerd alone ([`PrivateContainerd::kill_daemon`]);
    /// [`restart_containerd`](Self::restart_containerd) starts it again.
    pub fn containerd_mut(&mut self) -> &mut PrivateContainerd {
        &mut self.ctd
    }

    pub fn handler(&self) -> &str {
        &self.setup.handler
    }

    /// The base of the waits: the per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.setup.timeout
    }

    /// Runs `script` with `sh -c` in container `id` within the per-call
    /// deadline; its stdout, failing on a non-zero exit.
    pub fn sh(&self, id: &str, script: &str) -> Result<String> {
        self.sh_within(id, script, self.timeout())
    }

    /// [`Kubelet::sh`] with its own deadline.
    pub fn sh_within(&self, id: &str, script: &str, timeout: Duration) -> Result<String> {
        let r = self.cri.exec_sync(id, &["sh", "-c", script], timeout)?;
        ensure!(r.exit_code == 0, "{script:?} in {id}: {r:?}");
        Ok(r.stdout)
    }

    /// A pod config as the kubelet makes one: a unique uid, the pod's
    /// cgroup under this instance's CRI cgroup root, its log directory.
    pub fn pod(&self, name: &str) -> PodBuilder {
        let n = self.next_uid.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{}-{n}", self.ctd.namespace());
        let log_dir = self
            .ctd
            .dir()
            .join("pods")
            .join(format!("default_{name}_{uid}"));
        PodBuilder::new(name)
            .uid(&uid)
            .cgroup_parent(&format!("{}/pod{uid}", self.ctd.cri_cgroup_root()))
            .log_directory(&log_dir.display().to_string())
    }

    /// Makes the pod's log dir and cgroups (the kubelet does both before
    /// RunPodSandbox), then runs it with the setup's handler.
    pub fn run_pod(&self, pod: &PodBuilder) -> Result<Pod> {
        let handler = self.setup.handler.clone();
        self.run_pod_as(pod, &handler).map(|(pod, _)| pod)
    }

    /// [`run_pod`](Self::run_pod) with `handler` instead of the setup's (a
    /// bench compares two handlers on one containerd). Also returns when
    /// RunPodSandbox was sent, after the kubelet-side preparation, so that
    /// a start latency measures the CRI and the runtime only.
    pub fn run_pod_as(&self, pod: &PodBuilder, handler: &str) -> Result<(Pod, Instant)> {
        let mut pod = self.prepare_pod(pod)?;
        let sent = Instant::now();
        match self.cri.run_pod_sandbox(&pod.config, handler) {
            Ok(id) => self.track_pod(&mut pod, id),
            Err(e) => {
                // As the kubelet does when a sandbox fails to start.
                self.discard_prepared(&pod);
                return Err(e);
            }
        }
        Ok((pod, sent))
    }

    /// What the kubelet does before RunPodSandbox: the pod's config, its
    /// log dir and cgroups. The pod has no id yet ([`track_pod`] gives it
    /// one, or [`discard_prepared`] undoes this).
    ///
    /// [`track_pod`]: Self::track_pod
    /// [`discard_prepared`]: Self::discard_prepared
    pub fn prepare_pod(&self, pod: &PodBuilder) -> Result<Pod> {
        let config = pod.build();
        let linux = config.linux.as_ref();
        let cgroup = linux.map(|l| l.cgroup_parent.clone()).unwrap_or_default();
        let log_dir = PathBuf::from(&config.log_directory);
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating the pod log dir {}", log_dir.display()))?;
        if !cgroup.is_empty() {
            for dir in cgroup_dirs(&cgroup) {
                fs::create_dir_all(&dir)
                    .with_context(|| format!("creating the pod cgroup {}", dir.display()))?;
            }
        }
        Ok(Pod {
            id: String::new(),
            config,
            cgroup,
            log_dir,
        })
    }

    /// Records that prepared `pod` runs as sandbox `id` (its leftovers are
    /// looked for, and a failed test removes it).
    pub fn track_pod(&self, pod: &mut Pod, id: String) {
        pod.id = id;
        lock(&self.pod_ids).push(pod.id.clone());
        self.note_sockets();
    }

    /// Undoes [`prepare_pod`](Self::prepare_pod) for a pod that never ran.
    pub fn discard_prepared(&self, pod: &Pod) {
        if !pod.cgroup.is_empty() {
            for dir in cgroup_dirs(&pod.cgroup) {
                let _ = fs::remove_dir(&dir);
            }
        }
        let _ = fs::remove_dir_all(&pod.log_dir);
    }

    /// CreateContainer and StartContainer in `pod`; returns the id.
    pub fn run_container(&self, pod: &Pod, c: &ContainerBuilder) -> Result<String> {
        let id = self.create_container(pod, c)?;
        self.cri.start_container(&id)?;
        Ok(id)
    }

    pub fn create_container(&self, pod: &Pod, c: &ContainerBuilder) -> Result<String> {
        let id = self
            .cri
            .create_container(&pod.id, &c.build(), &pod.config)?;
        self.note_sockets();
        Ok(id)
    }

    /// StopPodSandbox, RemovePodSandbox, then what the kubelet does after
    /// (removing the pod's cgroups and log dir), failing with whatever the
    /// pod left behind.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.cri.stop_pod_sandbox(&pod.id)?;
        self.cri.remove_pod_sandbox(&pod.id)?;
        let mut last = Vec::new();
        let settled = self.cri.wait_for("the pod's leftovers to go", SETTLE, |_| {
            last = self.pod_leaks(pod)?;
            Ok(last.is_empty().then_some(()))
        });
        if settled.is_err() {
            bail!("pod {} left: {last:#?}", pod.id);
        }
        let mut errors = Vec::new();
        // Only the pod's own cgroup: the CRI root may hold other pods' and
        // goes in finish().
        for dir in cgroup_dirs(&pod.cgroup) {
            if dir.exists() {
                if let Err(e) = fs::remove_dir(&dir) {
                    errors.push(format!("rmdir {}: {e}", dir.display()));
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&pod.log_dir) {
            errors.push(format!("removing {}: {e}", pod.log_dir.display()));
        }
        ensure!(errors.is_empty(), "removing pod {}: {errors:?}", pod.id);
        Ok(())
    }

    /// [`Kubelet::remove_pod`] of each of `pods` at once; the failures.
    pub fn remove_pods<'a>(&self, pods: impl Iterator<Item = &'a Pod>) -> Vec<String> {
        std::thread::scope(|s| {
            let threads: Vec<_> = pods.map(|p| s.spawn(move || self.remove_pod(p))).collect();
            threads
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(removed) => removed.err().map(|e| format!("{e:#}")),
                    Err(_) => Some("a pod removal thread panicked".into()),
                })
                .collect()
        })
    }

    /// What pod `pod` left after RemovePodSandbox: listings, container
    /// cgroups under its cgroup, mounts and CNI cache entries naming it.
    fn pod_leaks(&self, pod: &Pod) -> Result<Vec<String>> {
        let mut leaks = Vec::new();
        if self.cri.list_pod_sandbox()?.iter().any(|p| p.id == pod.id) {
            leaks.push(format!("pod {} still listed", pod.id));
        }
        for c in self.cri.list_containers(Some(&pod.id))? {
            leaks.push(format!("container {} still listed", c.id));
        }
        if !pod.cgroup.is_empty() {
            leaks.extend(cgroup_children(&pod.cgroup));
        }
        leaks.extend(
            self.ctd
                .mounts()
                .into_iter()
                .filter(|m| m.to_string_lossy().contains(&pod.id))
                .map(|m| format!("mount {}", m.display())),
        );
        leaks.extend(cni_cache_entries(&pod.id));
        Ok(leaks)
    }

    /// Notes the shims' sockets now, for [`leak_report`](Self::leak_report).
    fn note_sockets(&self) {
        lock(&self.sockets).extend(self.ctd.shim_sockets_now());
    }

    /// Everything left while no pod should exist: pods or containers still
    /// listed, shims, their sockets, mounts in containerd's dir, network
    /// namespaces, runc state, cgroups under the CRI root, CNI cache
    /// entries, and the handler's own leftovers.
    pub fn leak_report(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        match self.cri.list_pod_sandbox() {
            Ok(pods) => leaks.extend(pods.iter().map(|p| format!("pod {} listed", p.id))),
            Err(e) => leaks.push(format!("{e:#}")),
        }
        match self.cri.list_containers(None) {
            Ok(cs) => leaks.extend(cs.iter().map(|c| format!("container {} listed", c.id))),
            Err(e) => leaks.push(format!("{e:#}")),
        }
        for pid in self.ctd.shims() {
            leaks.push(format!("shim process {pid}"));
        }
        for s in lock(&self.sockets).iter().filter(|s| s.exists()) {
            leaks.push(format!("socket {}", s.display()));
        }
        for m in self.ctd.mounts() {
            leaks.push(format!("mount {}", m.display()));
        }
        // runc keeps one dir per containerd namespace in its root.
        let runc_ns = fs::read_dir(self.ctd.runc_root())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        for dir in std::iter::once(self.ctd.netns_dir()).chain(runc_ns) {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                leaks.push(format!("left in {}: {:?}", dir.display(), e.file_name()));
            }
        }
        leaks.extend(cgroup_children(&self.ctd.cri_cgroup_root()));
        for id in lock(&self.pod_ids).iter() {
            leaks.extend(cni_cache_entries(id));
        }
        if let Some(extra) = &self.setup.extra_leaks {
            leaks.extend(extra(&self.ctd));
        }
        leaks
    }

    /// Stops containerd with SIGTERM and starts it again on the same state
    /// (the shims keep running), reconnects, and waits for the CRI.
    /// Switches this containerd to `count` dual-stack bridge networks (see
    /// [`PrivateContainerd::use_bridge_networks`]) and restarts it.
    pub fn use_bridge_networks(&mut self, count: usize) -> Result<Vec<String>> {
        let bridges = self.ctd.use_bridge_networks(count)?;
        self.restart_containerd()?;
        Ok(bridges)
    }

    pub fn restart_containerd(&mut self) -> Result<()> {
        self.restart_containerd_then(|| {})
    }

    /// [`restart_containerd`](Self::restart_containerd), running `stopped`
    /// while containerd is down (e.g. to let a paused guest go on before
    /// containerd reloads its shims).
    pub fn restart_containerd_then(&mut self, stopped: impl FnOnce()) -> Result<()> {
        self.ctd.restart_with(stopped)?;
        self.cri = Cri::connect(self.ctd.address())?.with_timeout(self.setup.timeout);
        self.cri.wait_ready(self.setup.timeout)
    }

    /// Sends `call` on a CRI connection of its own, in another thread; once
    /// `reached()` says the call got to the runtime (it polls it until
    /// `within`), restarts containerd under it, running `stopped` as in
    /// [`restart_containerd_then`](Self::restart_containerd_then). Returns
    /// what the call returned: mostly an error, as containerd went away.
    pub fn restart_containerd_during<T: Send>(
        &mut self,
        call: impl FnOnce(&Cri) -> Result<T> + Send,
        mut reached: impl FnMut() -> bool,
        within: Duration,
        stopped: impl FnOnce(),
    ) -> Result<Result<T>> {
        let other = Cri::connect(self.ctd.address())?.with_timeout(self.setup.timeout);
        std::thread::scope(|s| {
            let caller = s.spawn(move || call(&other));
            let deadline = Instant::now() + within;
            while !reached() {
                if caller.is_finished() {
                    let ended = caller.join().map_err(|_| anyhow!("the call panicked"))?;
                    let how = ended.err().map(|e| format!("{e:#}"));
                    bail!("the call ended before it reached the runtime: {how:?}");
                }
                if Instant::now() >= deadline {
                    bail!("the call did not reach the runtime within {within:?}");
                }
                std::thread::sleep(POLL);
            }
            self.restart_containerd_then(stopped)?;
            caller.join().map_err(|_| anyhow!("the call panicked"))
        })
    }

    /// Ends the test: nothing may be left (after a settling time for
    /// asynchronous cleanup); then the CRI cgroup root goes and containerd
    /// stops, which must leave nothing either.
    pub fn finish(mut self) -> Result<()> {
        self.finished = true;
        let mut leaks = Vec::new();
        let settled = self
            .cri
            .wait_for("the test's leftovers to go", SETTLE, |_| {
                leaks = self.leak_report();
                Ok(leaks.is_empty().then_some(()))
            });
        if let Err(e) = settled {
            leaks.push(format!("{e:#}"));
        }
        for dir in cgroup_dirs(&self.ctd.cri_cgroup_root()) {
            if dir.exists() {
                if let Err(e) = fs::remove_dir(&dir) {
                    leaks.push(format!("rmdir {}: {e}", dir.display()));
                }
            }
        }
        if let Err(e) = self.ctd.stop() {
            leaks.push(format!("stopping containerd: {e:#}"));
        }
        leaks.extend(self.ctd.leak_report());
        ensure!(leaks.is_empty(), "leaks after the test: {leaks:#?}");
        Ok(())
    }
}

impl Drop for Kubelet {
    /// A failed test still removes its pods through the CRI, so that
    /// containerd's own cleanup (and the CNI cache) is done; what is left
    /// then goes with the PrivateContainerd.
    fn drop(&mut self) {
        if !self.finished {
            // What CI shows of a failure: the shim logs into containerd's.
            let log = fs::read_to_string(self.ctd.log_path()).unwrap_or_default();
            let problems: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("level=warning") || l.contains("level=error"))
                .collect();
            // The first ones say what went wrong, the last what followed.
            let first = &problems[..problems.len().min(20)];
            let last = &problems[problems.len().saturating_sub(20).max(first.len())..];
            eprintln!(
                "the test ended without Kubelet::finish; containerd's first and last warnings and errors ({}):\n{}\n...\n{}",
                self.ctd.log_path().display(),
                first.join("\n"),
                last.join("\n")
            );
            if let Some(report) = &self.setup.failure_report {
                eprintln!("{}", report());
            }
        }
        let ids: Vec<String> = lock(&self.pod_ids).clone();
        let listed = self.cri.list_pod_sandbox().unwrap_or_default();
        for p in listed.iter().filter(|p| ids.contains(&p.id)) {
            let _ = self.cri.stop_pod_sandbox(&p.id);
            let _ = self.cri.remove_pod_sandbox(&p.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `cgroup` (a cgroupfs path) in every hierarchy mounted under
/// /sys/fs/cgroup (cgroup v1 hybrid: one per controller, plus unified).
fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let rel = cgroup.trim_start_matches('/');
    fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join(rel))
        .collect()
}

/// Cgroups below `cgroup` in any hierarchy.
fn cgroup_children(cgroup: &str) -> Vec<String> {
    cgroup_dirs(cgroup)
        .iter()
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| format!("cgroup {}", e.path().display()))
        .collect()
}

fn cni_cache_entries(pod_id: &str) -> Vec<String> {
    fs::read_dir(CNI_CACHE)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(pod_id))
        .map(|e| format!("CNI cache {}", e.path().display()))
        .collect()
}

/// Builds an image tarball with tests/images/<script> into `dir`, once per
/// process; written under a temporary name and renamed, so that test
/// binaries running at once never read a half-written tarball.
pub fn image_tar(dir: &Path, script: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let name = script.trim_start_matches("build-").trim_end_matches(".sh");
    let tar = dir.join(format!("cri-{name}.tar"));
    let mut built = lock(&BUILT);
    if !built.iter().any(|s| s == script) {
        let tmp = dir.join(format!("cri-{name}.tar.{}", std::process::id()));
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("images")
            .join(script);
        let status = Command::new(&path)
            .arg(&tmp)
            .status()
            .with_context(|| format!("running {}", path.display()))?;
        ensure!(status.success(), "{script} failed: {status}");
        fs::rename(&tmp, &tar)?;
        built.push(script.to_owned());
    }
    Ok(tar)
}
