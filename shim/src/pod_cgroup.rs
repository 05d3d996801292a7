//! The host cgroup of a pod's VM: the VMM, virtiofsd and the vhost helpers
//! of one pod go into the cgroup the CRI names for the sandbox, so the pod's
//! overhead is accounted (and limited) under the kubelet's pod cgroup.
//!
//! The sandbox's OCI spec carries the path in `linux.cgroupsPath`, in the
//! form of containerd's cgroup driver:
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<sandbox-id>`, a path below the
//!   root of every hierarchy (cgroup v1) or of the unified one (v2);
//! - systemd: `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, a
//!   transient scope `cri-containerd-<id>.scope` in that slice, created
//!   through systemd's D-Bus API (with a first process: systemd creates no
//!   empty scope).
//!
//! [`cgroups_rs`] (Kata's crate) does the work for both drivers and both
//! cgroup versions. We never remove a cgroup that still holds processes:
//! [`PodCgroup::destroy`] waits (bounded) for it to empty, and the removal is
//! a plain `rmdir`, which the kernel refuses for a populated cgroup. (The
//! crate's own `destroy` first moves any process out, which could take a
//! stranger's process along with the cgroup.)
//!
//! Calls other than the waits are synchronous: cgroupfs writes, or one
//! D-Bus round trip with the systemd driver.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cgroups_rs::fs::{hierarchies, Cgroup};
use cgroups_rs::manager::{is_systemd_cgroup, FsManager, Manager, SystemdManager};
use cgroups_rs::systemd::utils::expand_slice;
use cgroups_rs::CgroupPid;
use clh_hypervisor::wait::wait_until;
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

/// Exists when systemd is the init system (what `sd_booted(3)` checks).
const SYSTEMD_RUNNING_DIR: &str = "/run/systemd/system";

const SLICE_SUFFIX: &str = ".slice";
const SCOPE_SUFFIX: &str = ".scope";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid linux.cgroupsPath {path:?}: {problem}")]
    InvalidPath { path: String, problem: String },

    #[error(
        "linux.cgroupsPath {path:?} asks for the systemd cgroup driver, but systemd is not \
         running on this host (no {SYSTEMD_RUNNING_DIR}); configure the cgroupfs driver instead: \
         SystemdCgroup = false in containerd's runtime options for clh (and cgroupDriver: \
         cgroupfs in the kubelet's configuration)"
    )]
    SystemdNotRunning { path: String },

    #[error(
        "no cgroup filesystem is mounted at /sys/fs/cgroup; the pod cgroup {path} cannot be made"
    )]
    NoCgroupFs { path: String },

    #[error("cannot {action} the pod cgroup {path}")]
    Cgroup {
        action: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "the pod cgroup {path} still holds processes after {timeout:?}: {procs}; it is left in \
         place (stop them, then run the delete again)"
    )]
    Busy {
        path: String,
        timeout: Duration,
        procs: String,
    },

    #[error(
        "the pod cgroup {path} already exists and holds processes ({procs}); is another sandbox \
         using the same cgroupsPath?"
    )]
    InUse { path: String, procs: String },
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Which of containerd's cgroup drivers a `cgroupsPath` is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

/// A checked `linux.cgroupsPath`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupsPath {
    spec: String,
    driver: Driver,
    relative: String,
}

impl CgroupsPath {
    /// Checks `spec` and works out where the cgroup lives. A cgroupfs path
    /// must be absolute, without `.` or `..` components; a systemd path is
    /// `<slice>.slice:<prefix>:<name>`.
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |problem: &str| CgroupError::InvalidPath {
            path: spec.to_string(),
            problem: problem.to_string(),
        };
        if spec.contains('\0') {
            return Err(invalid("it contains a NUL byte"));
        }
        if is_systemd_cgroup(spec) {
            let relative = systemd_relative_path(spec).map_err(|p| invalid(&p))?;
            return Ok(Self {
                spec: spec.to_string(),
                driver: Driver::Systemd,
                relative,
            });
        }
        let Some(rest) = spec.strip_prefix('/') else {
            return Err(invalid(
                "a cgroupfs path must be absolute (like /kubepods/burstable/pod<uid>/<id>); \
                 a systemd one is <slice>.slice:<prefix>:<name>",
            ));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return Err(invalid(
                "it must name a cgroup below the root, without empty, . or .. components",
            ));
        }
        Ok(Self {
            spec: spec.to_string(),
            driver: Driver::Cgroupfs,
            relative: parts.join("/"),
        })
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// The cgroup's path below each hierarchy's root, e.g.
    /// `kubepods/burstable/pod<uid>/<id>`, or for systemd
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`.
    pub fn relative(&self) -> &str {
        &self.relative
    }
}

impl fmt::Display for CgroupsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

/// Where systemd puts the unit of `slice:prefix:name`: the slice expanded
/// into its parents (`a-b.slice` is `a.slice/a-b.slice`), then the unit, a
/// scope `prefix-name.scope` unless `name` is itself a slice. The same rules
/// as cgroups-rs's `SystemdManager` (and runc's), which creates it.
fn systemd_relative_path(spec: &str) -> Result<String, String> {
    let mut parts = spec.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("a systemd path is <slice>.slice:<prefix>:<name>".into());
    };
    if name.is_empty() || [prefix, name].iter().any(|p| p.contains('/') || *p == "..") {
        return Err("the unit name and prefix must be non-empty names without /".into());
    }
    let slice_dir = expand_slice(slice).map_err(|_| {
        format!("{slice:?} is not a valid slice name (dash-separated words ending in .slice)")
    })?;
    let unit = if name.ends_with(SLICE_SUFFIX) {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}{SCOPE_SUFFIX}")
    } else {
        format!("{prefix}-{name}{SCOPE_SUFFIX}")
    };
    Ok(if slice_dir.is_empty() {
        unit
    } else {
        format!("{slice_dir}/{unit}")
    })
}

/// Whether systemd is the init system here.
pub fn systemd_running() -> bool {
    Path::new(SYSTEMD_RUNNING_DIR).is_dir()
}

/// Limits for the whole cgroup. `None` leaves a resource unlimited (as
/// inherited from the pod cgroup above it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    /// CFS quota: `quota_us` of CPU time every `period_us`.
    pub cpu_quota: Option<(u64, u64)>,
}

impl CgroupLimits {
    /// CFS period we use: the kernel's default, 100 ms.
    pub const PERIOD_US: u64 = 100_000;

    /// A VM's share: its guest RAM plus `host_overhead_mib` for the VMM and
    /// helpers' own memory, and as many CPUs as it has vCPUs.
    pub fn for_vm(size: clh_hypervisor::VmSize, host_overhead_mib: u32) -> Self {
        let mib = u64::from(size.memory_mib) + u64::from(host_overhead_mib);
        Self {
            memory_bytes: Some(mib << 20),
            cpu_quota: Some((u64::from(size.vcpus) * Self::PERIOD_US, Self::PERIOD_US)),
        }
    }

    fn to_oci(self) -> LinuxResources {
        let mut resources = LinuxResources::default();
        if let Some(bytes) = self.memory_bytes {
            let mut memory = LinuxMemory::default();
            memory.set_limit(Some(i64::try_from(bytes).unwrap_or(i64::MAX)));
            resources.set_memory(Some(memory));
        }
        if let Some((quota, period)) = self.cpu_quota {
            let mut cpu = LinuxCpu::default();
            cpu.set_quota(Some(i64::try_from(quota).unwrap_or(i64::MAX)));
            cpu.set_period(Some(period));
            resources.set_cpu(Some(cpu));
        }
        resources
    }
}

/// One pod's host cgroup, made by [`PodCgroup::create`] and removed by
/// [`PodCgroup::destroy`] (or [`remove_leftover`] after a shim crash).
/// Dropping it leaves the cgroup in place.
pub struct PodCgroup {
    path: CgroupsPath,
    manager: Box<dyn Manager>,
    /// The cgroupfs view of the same cgroup: its processes and directories.
    fs: Cgroup,
    /// The pids we put here, to tell them from strangers in errors.
    added: Vec<u32>,
}

impl fmt::Debug for PodCgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodCgroup")
            .field("path", &self.path)
            .field("added", &self.added)
            .finish_non_exhaustive()
    }
}

impl PodCgroup {
    /// Makes the cgroup of `cgroups_path` (and any missing parent, as runc
    /// does). With the cgroupfs driver the directories exist on return;
    /// with systemd the scope is started by the first
    /// [`add_process`](Self::add_process). An existing cgroup is reused
    /// only when it holds no process.
    pub fn create(cgroups_path: &str) -> Result<Self> {
        let path = CgroupsPath::parse(cgroups_path)?;
        let fs = load(&path)?;
        let manager: Box<dyn Manager> = match path.driver {
            Driver::Systemd => {
                if !systemd_running() {
                    return Err(CgroupError::SystemdNotRunning {
                        path: path.spec.clone(),
                    });
                }
                Box::new(SystemdManager::new(&path.spec).map_err(failed("set up", &path))?)
            }
            Driver::Cgroupfs => {
                let procs = fs.procs();
                if !procs.is_empty() {
                    return Err(CgroupError::InUse {
                        path: path.spec.clone(),
                        procs: describe(&procs, &[]),
                    });
                }
                if let Err(e) = fs.create() {
                    // Only empty directories go; a parent that others use
                    // stays.
                    let _ = fs.delete();
                    return Err(failed("create", &path)(e));
                }
                Box::new(FsManager::new(&path.relative).map_err(failed("set up", &path))?)
            }
        };
        tracing::debug!(cgroup = %path, "pod cgroup created");
        Ok(Self {
            path,
            manager,
            fs,
            added: Vec::new(),
        })
    }

    pub fn path(&self) -> &CgroupsPath {
        &self.path
    }

    /// Moves process `pid` (all its threads) into the cgroup; the children
    /// it forks later are born there. Add each process before it allocates
    /// much (a VMM before it boots the guest): memory charged elsewhere
    /// stays charged there.
    pub fn add_process(&mut self, pid: u32) -> Result<()> {
        self.manager
            .add_proc(CgroupPid::from(u64::from(pid)))
            .map_err(failed("add a process to", &self.path))?;
        self.added.push(pid);
        Ok(())
    }

    /// Sets the cgroup's memory and CPU limits. With systemd, call it after
    /// the first process is added (the scope exists only from then on).
    pub fn set_limits(&mut self, limits: CgroupLimits) -> Result<()> {
        self.manager
            .set(&limits.to_oci())
            .map_err(failed("set limits on", &self.path))
    }

    /// The pids in the cgroup, in any hierarchy.
    pub fn procs(&self) -> Vec<u32> {
        pids(&self.fs)
    }

    /// The cgroup's directory in each hierarchy (one with cgroup v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        dirs(&self.fs)
    }

    /// Waits up to `timeout` for the cgroup to empty (the caller has
    /// stopped the VM), then removes it. A cgroup still holding processes
    /// is left in place, and the error names them.
    pub async fn destroy(self, timeout: Duration) -> Result<()> {
        wait_empty(&self.fs, &self.path, &self.added, timeout).await?;
        remove(self.path, self.fs, Some(self.manager)).await
    }
}

/// After a shim crash (`containerd-shim delete`): removes the pod cgroup of
/// `cgroups_path` once it is empty, waiting up to `timeout` for that. A
/// missing cgroup is not an error; so a second call does nothing.
pub async fn remove_leftover(cgroups_path: &str, timeout: Duration) -> Result<()> {
    let path = CgroupsPath::parse(cgroups_path)?;
    if path.driver == Driver::Systemd && !systemd_running() {
        // We could never have made it.
        return Ok(());
    }
    let fs = load(&path)?;
    if !fs.exists() {
        return Ok(());
    }
    wait_empty(&fs, &path, &[], timeout).await?;
    let manager: Option<Box<dyn Manager>> = match path.driver {
        Driver::Systemd => Some(Box::new(
            SystemdManager::new(&path.spec).map_err(failed("set up", &path))?,
        )),
        Driver::Cgroupfs => None,
    };
    remove(path, fs, manager).await
}

/// The cgroupfs handle of `path`, in whatever hierarchy this host has.
fn load(path: &CgroupsPath) -> Result<Cgroup> {
    let hierarchy = hierarchies::auto();
    if !hierarchy.v2() && hierarchy.subsystems().is_empty() {
        return Err(CgroupError::NoCgroupFs {
            path: path.spec.clone(),
        });
    }
    Ok(Cgroup::load(hierarchy, &path.relative))
}

async fn wait_empty(
    fs: &Cgroup,
    path: &CgroupsPath,
    ours: &[u32],
    timeout: Duration,
) -> Result<()> {
    let emptied = wait_until("the pod cgroup to empty", timeout, || async {
        pids(fs).is_empty().then_some(())
    })
    .await;
    emptied.map_err(|_| CgroupError::Busy {
        path: path.spec.clone(),
        timeout,
        procs: describe(&fs.procs(), ours),
    })
}

/// Removes an empty cgroup: `rmdir` in every hierarchy (the kernel refuses
/// if a process got in meanwhile), or with systemd, stops its scope.
async fn remove(path: CgroupsPath, fs: Cgroup, manager: Option<Box<dyn Manager>>) -> Result<()> {
    let spec = path.spec.clone();
    // cgroups-rs retries a busy rmdir with short sleeps: keep them off the
    // async runtime's threads.
    let removed = tokio::task::spawn_blocking(move || match (path.driver, manager) {
        (Driver::Systemd, Some(mut manager)) => manager.destroy().map_err(failed("stop", &path)),
        _ => fs.delete().map_err(failed("remove", &path)),
    })
    .await
    .map_err(|e| CgroupError::Cgroup {
        action: "remove",
        path: spec.clone(),
        source: e.into(),
    })?;
    if removed.is_ok() {
        tracing::debug!(cgroup = %spec, "pod cgroup removed");
    }
    removed
}

fn pids(fs: &Cgroup) -> Vec<u32> {
    fs.procs()
        .into_iter()
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect()
}

fn dirs(fs: &Cgroup) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs
        .subsystems()
        .iter()
        .map(|s| s.to_controller().path().to_path_buf())
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// `pid 12 (cloud-hyperviso, ours), pid 40 (sleep)`, for errors.
fn describe(procs: &[CgroupPid], ours: &[u32]) -> String {
    procs
        .iter()
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "exited".into());
            let ours = u32::try_from(p.pid).is_ok_and(|pid| ours.contains(&pid));
            let ours = if ours { ", ours" } else { "" };
            format!("pid {} ({comm}{ours})", p.pid)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn failed<'a, E>(action: &'static str, path: &'a CgroupsPath) -> impl FnOnce(E) -> CgroupError + 'a
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| CgroupError::Cgroup {
        action,
        path: path.spec.clone(),
        source: Box::new(e),
    }
}

#[cfg(test)]
#[path = "pod_cgroup_tests.rs"]
mod tests;
