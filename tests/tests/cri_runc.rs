//! The CRI scenarios (tests/src/cri/scenarios.rs) with the `runc` runtime
//! handler, through the CRI plugin of a private containerd 2.1: the
//! baseline that the `clh` handler's run of the same scenarios is held to.
//! Each scenario runs its own containerd and fails on any leftover (shim,
//! socket, mount, netns, cgroup, CNI cache entry). What each proves:
//!
//! - `two_containers`: a pod with two containers runs; ExecSync returns
//!   stdout, stderr and the exit code (`echo hi; exit 3` → "hi\n", 3);
//!   with runc both containers see the host's kernel boot id.
//! - `container_stats`: ContainerStats and ListContainerStats (per pod and
//!   for all) report non-zero CPU usage and memory working set.
//! - `oom_killed`: a container over its 32 MiB limit ends EXITED, exit
//!   code 137, reason "OOMKilled".
//! - `stop_grace_period`: StopContainer waits the grace period (3 s) for a
//!   container that ignores SIGTERM, then kills it (137); one that handles
//!   SIGTERM stops at once with its own status (0).
//! - `remove_running_pod`: StopPodSandbox and RemovePodSandbox with the
//!   containers still running leave nothing; pod-level resources reach the
//!   sandbox spec as `io.kubernetes.cri.sandbox-*` annotations.
//! - `streaming`: streaming Exec (stdout, stderr, stdin, exit status) and
//!   Attach through containerd's streaming server, over the Kubernetes
//!   remote-command WebSocket protocol, as `kubectl exec`/`attach` use it.
//! - `parallel_pods`: five pods run, exec and are removed concurrently.
//! - `containerd_restart`: after containerd is restarted (SIGTERM) under a
//!   running pod, the same shims serve it: pod and container still listed
//!   and running, ExecSync works, removal is clean.
//! - `pod_sysctls`: the pod's sysctls (`kernel.shm_rmid_forced`,
//!   `kernel.msgmax`, `net.ipv4.ip_unprivileged_port_start`) hold in each of
//!   its containers from their start; a pod asking for `vm.swappiness` (not
//!   namespaced) does not start, and the error names it.
//! - `read_only_submounts`: a read-only volume holding a read-write tmpfs
//!   leaves the tmpfs writable; with `recursiveReadOnly` (runc reports it to
//!   containerd) both are read-only.
//! - `mount_propagation`: a mount the host makes below a HostToContainer
//!   volume after the container started appears in it; a mount a privileged
//!   container makes below a Bidirectional volume appears on the host.
//!
//! Run one at a time (`-- --test-threads=1`) on a small host: each starts a
//! containerd.

use std::path::Path;

use clh_tests::cri::{scenarios, CriSetup};

fn setup() -> CriSetup {
    CriSetup::new("runc", Path::new(env!("CARGO_TARGET_TMPDIR")))
}

#[test]
fn two_containers() {
    let seen = scenarios::two_containers(&setup()).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for id in &seen.boot_ids {
        assert_eq!(id, host.trim(), "runc containers share the host kernel");
    }
}

#[test]
fn container_stats() {
    scenarios::container_stats(&setup()).unwrap();
}

#[test]
fn oom_killed() {
    scenarios::oom_killed(&setup()).unwrap();
}

#[test]
fn stop_grace_period() {
    scenarios::stop_grace_period(&setup()).unwrap();
}

#[test]
fn remove_running_pod() {
    scenarios::remove_running_pod(&setup()).unwrap();
}

#[test]
fn streaming() {
    scenarios::streaming(&setup()).unwrap();
}

#[test]
fn large_output() {
    scenarios::large_output(&setup()).unwrap();
}

#[test]
fn parallel_pods() {
    scenarios::parallel_pods(&setup()).unwrap();
}

#[test]
fn containerd_restart() {
    scenarios::containerd_restart(&setup()).unwrap();
}

#[test]
fn seccomp_profiles() {
    scenarios::seccomp_profiles(&setup()).unwrap();
}

#[test]
fn pod_sysctls() {
    let error = scenarios::pod_sysctls(&setup()).unwrap();
    assert!(
        error.contains("not in a separate kernel namespace"),
        "{error}"
    );
}

#[test]
fn read_only_submounts() {
    let rro = scenarios::read_only_submounts(&setup()).unwrap();
    assert!(
        rro,
        "containerd 2.1 introspects runc: recursiveReadOnly is reported"
    );
}

#[test]
fn mount_propagation() {
    let bidi = scenarios::mount_propagation(&setup()).unwrap();
    assert!(
        matches!(bidi, scenarios::Bidirectional::Propagated),
        "{bidi:?}"
    );
}
