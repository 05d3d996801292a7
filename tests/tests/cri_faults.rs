//! Faults of a running pod's host processes, through CRI on real VMs
//! (issue 13; catalogue REL-*): the pod fails visibly and in time, and its
//! removal leaves nothing.
//!
//! - `rel_vfs_01_virtiofsd_sigkill`: virtiofsd is killed; within 10 s every
//!   container has exited and the pod is NotReady.
//! - `rel_vmm_01_vmm_sigkill`: the same for the VMM.
//!
//! Run one at a time (`-- --test-threads=1`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, ContainerState, CriSetup, Kubelet, BUSYBOX};
use clh_tests::ctr::{self, vm_processes};

const AGENT_TIMEOUT_MS: u64 = 120_000;
/// How soon the pod must be seen failed (REL-VMM-01: 10 s).
const DETECTION: Duration = Duration::from_secs(10);

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let shim_dir = ctr::shim_dir().expect("building the shim");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cri = ctr::cri_setup(&s, shim_dir, images, AGENT_TIMEOUT_MS).expect("CRI setup");
    (s, cri)
}

/// A pod of two sleepers; `program` (a process of its VM) is SIGKILLed;
/// every container must be EXITED and the pod NotReady within
/// [`DETECTION`]; then the pod's removal must leave nothing.
fn kill_and_watch(s: &ctr::Setup, cri: &CriSetup, program: &str) -> Result<()> {
    let k = Kubelet::start(cri)?;
    let pod = k.run_pod(&k.pod("fault"))?;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let c = ContainerBuilder::new(name, BUSYBOX).command(&["sleep", "100000"]);
        let id = k.run_container(&pod, &c)?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        ids.push(id);
    }
    let victims = vm_processes(program, &s.state_dir.join(&pod.id));
    ensure!(!victims.is_empty(), "no {program} of pod {} found", pod.id);
    let killed = Instant::now();
    for pid in victims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .with_context(|| format!("killing {program} {pid}"))?;
    }
    for id in &ids {
        k.cri()
            .wait_container_state(id, ContainerState::ContainerExited, DETECTION)
            .with_context(|| format!("container {id} after {program} was killed"))?;
    }
    k.cri()
        .wait_for("the pod NotReady", DETECTION, |c| {
            let ready = c.pod_sandbox_status(&pod.id)?.state;
            Ok((ready == k8s_cri::v1::PodSandboxState::SandboxNotready as i32).then_some(()))
        })
        .context("the pod's state after the kill")?;
    ensure!(
        killed.elapsed() < DETECTION + Duration::from_secs(2),
        "the pod took {:?} to fail",
        killed.elapsed()
    );
    k.remove_pod(&pod)?;
    k.finish()
}

#[test]
fn rel_vfs_01_virtiofsd_sigkill() {
    let (s, cri) = setup();
    kill_and_watch(&s, &cri, "virtiofsd").unwrap();
}

#[test]
fn rel_vmm_01_vmm_sigkill() {
    let (s, cri) = setup();
    kill_and_watch(&s, &cri, "qemu-system-x86_64").unwrap();
}
