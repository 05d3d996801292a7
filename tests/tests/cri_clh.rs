//! Kubernetes pods through CRI with the `clh` runtime handler: the same
//! scenarios as the runc baseline (tests/tests/cri_runc.rs; the list of
//! what each proves is there), on a private containerd 2.1 whose `clh`
//! handler is our shim, booting QEMU TCG VMs. What this adds:
//!
//! - `two_containers`: the pod's two containers report one kernel boot id,
//!   and not the host's: one VM per pod, shared by its containers.
//! - `pod_vm_sized_hostnamed_and_in_its_cgroup`: pod-level resources size
//!   the VM (vCPUs and memory seen in the guest), the pod's hostname is the
//!   guest's, and the VMM and virtiofsd run in the pod's host cgroup.
//! - `restart_and_update_in_the_pod_vm`: a restarted container (a new
//!   attempt) runs in the same VM; UpdateContainerResources reaches its
//!   guest cgroup.
//! - `pod_sysctls`: as runc; the refusal of `vm.swappiness` says it is not
//!   namespaced, before any VM boots.
//! - `read_only_submounts`: as runc for `readonly`. containerd 2.1 asks
//!   only runc shims for their features, so it reports no
//!   `recursiveReadOnly` for `clh` and a kubelet never sends one (`rro` is
//!   run through ctr in ctr_volumes.rs instead).
//! - `mount_propagation`: HostToContainer as runc; Bidirectional is refused
//!   at StartContainer with an error that says why (a guest mount can
//!   never reach the host) and what to use instead.
//! - every scenario also fails on the shim's own leftovers: VM state
//!   directories, VMM, virtiofsd or vhost processes, mounts.
//!
//! Run one at a time (`-- --test-threads=1`): each boots VMs.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{scenarios, ContainerBuilder, CriSetup, Kubelet, Resources, BUSYBOX};
use clh_tests::ctr;

const MIB: i64 = 1024 * 1024;
/// Five TCG boots at once on a small host take a while.
const AGENT_TIMEOUT_MS: u64 = 120_000;

/// The shim config (kept alive with the setup) and the CRI setup for `clh`.
fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS)
}

#[test]
fn two_containers() {
    let (_s, cri) = setup();
    let seen = scenarios::two_containers(&cri).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let [a, b] = &seen.boot_ids;
    assert_eq!(a, b, "the pod's containers run in one VM");
    assert_ne!(a, host.trim(), "the pod runs in a VM, not on the host");
}

/// The same pod on containerd 1.6 (task API v2, config version 2).
#[test]
fn two_containers_containerd_1_6() {
    let (_s, mut cri) = setup();
    cri.version = clh_tests::containerd::ContainerdVersion::V1_6;
    let seen = scenarios::two_containers(&cri).unwrap();
    let [a, b] = &seen.boot_ids;
    assert_eq!(a, b, "the pod's containers run in one VM");
}

/// The same pod on containerd 1.7 (Debian 13's; config version 2).
#[test]
fn two_containers_containerd_1_7() {
    let (_s, mut cri) = setup();
    cri.version = clh_tests::containerd::ContainerdVersion::V1_7;
    let seen = scenarios::two_containers(&cri).unwrap();
    let [a, b] = &seen.boot_ids;
    assert_eq!(a, b, "the pod's containers run in one VM");
}

#[test]
fn container_stats() {
    scenarios::container_stats(&setup().1).unwrap();
}

#[test]
fn oom_killed() {
    scenarios::oom_killed(&setup().1).unwrap();
}

#[test]
fn stop_grace_period() {
    scenarios::stop_grace_period(&setup().1).unwrap();
}

#[test]
fn remove_running_pod() {
    scenarios::remove_running_pod(&setup().1).unwrap();
}

#[test]
fn streaming() {
    scenarios::streaming(&setup().1).unwrap();
}

/// 50 MiB written just before the exit all reach the log.
#[test]
fn large_output() {
    scenarios::large_output(&setup().1).unwrap();
}

#[test]
fn parallel_pods() {
    scenarios::parallel_pods(&setup().1).unwrap();
}

#[test]
fn containerd_restart() {
    scenarios::containerd_restart(&setup().1).unwrap();
}

/// The guest enforces the CRI's seccomp profiles as runc does, execs
/// included (libcontainer alone filtered only the init).
#[test]
fn seccomp_profiles() {
    scenarios::seccomp_profiles(&setup().1).unwrap();
}

#[test]
fn pod_sysctls() {
    let error = scenarios::pod_sysctls(&setup().1).unwrap();
    assert!(error.contains("is not namespaced"), "{error}");
}

#[test]
fn read_only_submounts() {
    let rro = scenarios::read_only_submounts(&setup().1).unwrap();
    assert!(
        !rro,
        "containerd 2.1 does not introspect non-runc shims; if it now does, assert the rro case ran"
    );
}

#[test]
fn mount_propagation() {
    match scenarios::mount_propagation(&setup().1).unwrap() {
        scenarios::Bidirectional::Refused(e) => assert!(
            e.contains("Bidirectional") && e.contains("HostToContainer"),
            "{e}"
        ),
        other => panic!("Bidirectional was not refused: {other:?}"),
    }
}

/// A container restarted by the kubelet (a new attempt of the same name)
/// runs in the same VM, and UpdateContainerResources reaches the
/// container's cgroup in the guest.
#[test]
fn restart_and_update_in_the_pod_vm() {
    let (_s, cri) = setup();
    restart_and_update(&cri).unwrap();
}

fn restart_and_update(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("restarts"))?;
    let app = |attempt| {
        ContainerBuilder::new("app", BUSYBOX)
            .command(&["sleep", "100000"])
            .memory_limit(64 * MIB)
            .attempt(attempt)
    };
    let first = k.run_container(&pod, &app(0))?;
    let boot = scenarios::boot_id(cri, &first)?;
    cri.stop_container(&first, Duration::from_secs(1))?;
    let second = k.run_container(&pod, &app(1))?;
    ensure!(second != first, "a new attempt is a new container");
    ensure!(
        scenarios::boot_id(cri, &second)? == boot,
        "the restarted container left the pod's VM"
    );
    let limit = |id: &str| -> Result<String> {
        // The guest has no cgroup namespace for containers: their own
        // cgroup is the one /proc/self/cgroup names.
        let script = "cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/memory.max";
        let r = cri.exec_sync(id, &["sh", "-c", script], Duration::from_secs(30))?;
        ensure!(r.exit_code == 0, "{r:?}");
        Ok(r.stdout.trim().to_owned())
    };
    ensure!(
        limit(&second)? == (64 * MIB).to_string(),
        "the initial limit"
    );
    let bigger = Resources {
        memory_limit_bytes: 128 * MIB,
        ..Default::default()
    };
    cri.update_container_resources(&second, bigger)?;
    let now = limit(&second)?;
    ensure!(now == (128 * MIB).to_string(), "after the update: {now}");
    k.remove_pod(&pod)?;
    k.finish()
}

#[test]
fn pod_vm_sized_hostnamed_and_in_its_cgroup() {
    let (s, cri) = setup();
    sized_pod(&s, &cri).unwrap();
}

fn sized_pod(s: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    // 2 CPUs and 600 MiB for the pod: the VM gets the configured overhead
    // (256 MiB) on top, where a pod without limits gets 1 vCPU, 512 MiB.
    let resources = Resources {
        memory_limit_bytes: 600 * MIB,
        cpu_quota: 200_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    let pod = k.run_pod(&k.pod("sized").hostname("web-0").resources(resources))?;
    let sleeper = ContainerBuilder::new("app", BUSYBOX).command(&["sleep", "100000"]);
    let id = k.run_container(&pod, &sleeper)?;
    let exec = |cmd: &str| -> Result<String> {
        let r = k
            .cri()
            .exec_sync(&id, &["sh", "-c", cmd], Duration::from_secs(30))?;
        ensure!(r.exit_code == 0, "{cmd}: {r:?}");
        Ok(r.stdout.trim().to_owned())
    };
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nproc: usize = exec("nproc")?.parse().context("nproc")?;
    ensure!(
        nproc == host_cpus.min(2),
        "the guest has {nproc} vCPUs, expected min(2, {host_cpus})"
    );
    let mem_kib: u64 = exec("awk '/MemTotal/ {print $2}' /proc/meminfo")?
        .parse()
        .context("MemTotal")?;
    // 856 MiB of RAM less what the kernel keeps for itself.
    ensure!(
        (700 * 1024..=856 * 1024).contains(&mem_kib),
        "guest MemTotal {mem_kib} kB, expected about 856 MiB"
    );
    ensure!(exec("hostname")? == "web-0", "the guest's hostname");
    // The pod's host cgroup (under the parent the kubelet gave) holds the
    // VMM and virtiofsd.
    let needle = s.state_dir.display().to_string();
    let vm_pids: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(vm_pids.len() >= 2, "VM processes {vm_pids:?}");
    for pid in &vm_pids {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let memory = cgroups
            .lines()
            .find(|l| l.contains(":memory:") || l.starts_with("0::"))
            .unwrap_or_default();
        ensure!(
            memory.contains(&format!("{}/{}", pod.cgroup, pod.id)),
            "process {pid} is in {memory:?}, not the pod cgroup {}/{}",
            pod.cgroup,
            pod.id
        );
    }
    k.remove_pod(&pod)?;
    k.finish()
}
