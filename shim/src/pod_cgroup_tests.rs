//! Path checks and conversions everywhere; the cgroup's life on this host's
//! real cgroups (v1 or v2, cgroupfs driver) where we are root.

use std::process::{Child, Command};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clh_hypervisor::VmSize;

use super::*;

#[test]
fn cgroupfs_paths_are_taken_below_the_hierarchy_root() {
    let path = CgroupsPath::parse("/kubepods/burstable/pod123/abc").unwrap();
    assert_eq!(path.driver(), Driver::Cgroupfs);
    assert_eq!(path.relative(), "kubepods/burstable/pod123/abc");
    assert_eq!(path.to_string(), "/kubepods/burstable/pod123/abc");
}

#[test]
fn systemd_paths_become_the_scope_in_its_expanded_slice() {
    for (spec, relative) in [
        (
            "kubepods-burstable-pod123.slice:cri-containerd:abc",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice/cri-containerd-abc.scope",
        ),
        ("system.slice:docker:x", "system.slice/docker-x.scope"),
        ("system.slice::x", "system.slice/x.scope"),
        ("-.slice:p:x", "p-x.scope"),
        ("a-b.slice:p:c.slice", "a.slice/a-b.slice/c.slice"),
    ] {
        let path = CgroupsPath::parse(spec).unwrap();
        assert_eq!(path.driver(), Driver::Systemd, "{spec}");
        assert_eq!(path.relative(), relative, "{spec}");
    }
}

#[test]
fn bad_paths_are_refused_naming_the_path() {
    for bad in [
        "",
        "/",
        "kubepods/burstable/pod1/abc",
        "/kubepods/../etc",
        "/kubepods/./x",
        "/kubepods//x",
        "/kubepods/x/",
        "/kube\0pods",
        "kubepods.slice:cri",
        "a/b.slice:cri:x",
        "a--b.slice:cri:x",
        "kubepods.slice:cri:",
        "kubepods.slice:cri:../x",
        "kubepods.slice:c/ri:x",
    ] {
        let err = CgroupsPath::parse(bad).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidPath { .. }),
            "{bad:?}: {err:?}"
        );
        // The same check guards create, before anything is touched.
        let err = PodCgroup::create(bad).unwrap_err();
        assert!(
            err.to_string().contains("invalid linux.cgroupsPath"),
            "{err}"
        );
    }
    let err = CgroupsPath::parse("kubepods/x").unwrap_err().to_string();
    assert!(err.contains("must be absolute"), "{err}");
}

#[tokio::test]
async fn a_systemd_path_without_systemd_says_what_to_configure() {
    let spec = "kubepods-burstable-pod123.slice:cri-containerd:abc";
    if systemd_running() {
        clh_test_skip::skip("systemd runs here, so the error under test cannot happen");
        return;
    }
    let err = PodCgroup::create(spec).unwrap_err();
    assert!(
        matches!(err, CgroupError::SystemdNotRunning { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("systemd is not running") && text.contains("SystemdCgroup = false"),
        "{text}"
    );
    // Nothing of ours can be left behind under a driver we cannot use.
    remove_leftover(spec, Duration::from_secs(1)).await.unwrap();
}

#[test]
fn vm_limits_cover_guest_ram_plus_overhead_and_one_cpu_per_vcpu() {
    let limits = CgroupLimits::for_vm(
        VmSize {
            vcpus: 2,
            memory_mib: 512,
        },
        64,
    );
    assert_eq!(limits.memory_bytes, Some(576 << 20));
    assert_eq!(limits.cpu_quota, Some((200_000, 100_000)));
}

/// A unique cgroup parent for one test, removed (with anything left below
/// it, and the test's child) when dropped.
struct TestParent {
    relative: String,
    child: Option<Child>,
}

impl TestParent {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self {
            relative: format!("clh-shim-test-{name}-{}-{nanos}", std::process::id()),
            child: None,
        }
    }

    fn path(&self, below: &str) -> String {
        format!("/{}/{below}", self.relative)
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deepest first; rmdir only removes empty cgroups.
        for rel in ["pod/sandbox", "pod", ""] {
            let rel = format!("{}/{rel}", self.relative);
            let _ = Cgroup::load(hierarchies::auto(), rel.trim_end_matches('/')).delete();
        }
    }
}

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        clh_test_skip::skip("making host cgroups needs root");
    }
    root
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The directory of `controller` among the cgroup's (v1), or the unified
/// one (v2).
fn controller_dir(cgroup: &PodCgroup, controller: &str) -> PathBuf {
    let dirs = cgroup.dirs();
    if hierarchies::is_cgroup2_unified_mode() {
        return dirs[0].clone();
    }
    dirs.iter()
        .find(|d| {
            d.strip_prefix("/sys/fs/cgroup")
                .ok()
                .and_then(|r| r.components().next())
                .is_some_and(|c| c.as_os_str() == controller)
        })
        .unwrap_or_else(|| panic!("no {controller} hierarchy among {dirs:?}"))
        .clone()
}

/// A pod cgroup below a fresh test parent, holding a `sleep` of ours.
fn pod_with_sleep(name: &str) -> (TestParent, String, PodCgroup, u32) {
    let mut parent = TestParent::new(name);
    let spec = parent.path("pod/sandbox");
    let mut cgroup = PodCgroup::create(&spec).unwrap();
    for dir in cgroup.dirs() {
        assert!(dir.is_dir(), "{} was not created", dir.display());
    }
    let child = Command::new("sleep").arg("1000").spawn().unwrap();
    let pid = child.id();
    parent.child = Some(child);
    cgroup.add_process(pid).unwrap();
    (parent, spec, cgroup, pid)
}

#[tokio::test]
async fn a_pod_cgroup_holds_its_processes_takes_limits_and_is_removed_once_empty() {
    if !is_root() {
        return;
    }
    let (mut parent, spec, mut cgroup, pid) = pod_with_sleep("life");
    let dirs = cgroup.dirs();
    assert!(!dirs.is_empty());
    let memory = controller_dir(&cgroup, "memory");
    let cpu = controller_dir(&cgroup, "cpu");
    assert_eq!(cgroup.procs(), [pid]);
    for dir in [&memory, &cpu] {
        let procs = read(&dir.join("cgroup.procs"));
        assert_eq!(procs, pid.to_string(), "{}", dir.display());
    }

    let size = VmSize {
        vcpus: 1,
        memory_mib: 256,
    };
    cgroup.set_limits(CgroupLimits::for_vm(size, 64)).unwrap();
    if hierarchies::is_cgroup2_unified_mode() {
        assert_eq!(read(&memory.join("memory.max")), (320u64 << 20).to_string());
        assert_eq!(read(&cpu.join("cpu.max")), "100000 100000");
    } else {
        let limit = read(&memory.join("memory.limit_in_bytes"));
        assert_eq!(limit, (320u64 << 20).to_string());
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "100000");
    }

    // Someone else's cgroup in use is not taken over...
    let err = PodCgroup::create(&spec).unwrap_err();
    assert!(matches!(err, CgroupError::InUse { .. }), "{err:?}");
    // ...nor removed while it holds a process.
    let err = remove_leftover(&spec, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, CgroupError::Busy { .. }), "{err:?}");
    assert!(err.to_string().contains("(sleep)"), "{err}");
    assert!(memory.is_dir(), "a busy cgroup was removed");

    let mut child = parent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    cgroup.destroy(Duration::from_secs(5)).await.unwrap();
    for dir in &dirs {
        assert!(!dir.exists(), "{} is still there", dir.display());
    }
    // Idempotent: gone is fine.
    remove_leftover(&spec, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn destroy_waits_for_the_processes_to_leave_then_gives_up_naming_them() {
    if !is_root() {
        return;
    }
    let (mut parent, spec, cgroup, _) = pod_with_sleep("busy");
    let dirs = cgroup.dirs();

    let started = std::time::Instant::now();
    let err = cgroup
        .destroy(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(text.contains("(sleep, ours)"), "{text}");
    assert!(text.contains("left in place"), "{text}");
    assert!(dirs.iter().all(|d| d.is_dir()), "a busy cgroup was removed");

    // What the shim's delete does after a crash: the processes are gone,
    // the leftover goes.
    let mut child = parent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    remove_leftover(&spec, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(dirs.iter().all(|d| !d.exists()));
}
