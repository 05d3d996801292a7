//! Faults of a running pod's host processes, through CRI on real VMs
//! (issue 13; catalogue REL-*): the pod fails visibly and in time, and its
//! removal leaves nothing.
//!
//! - `rel_vfs_01_virtiofsd_sigkill`: virtiofsd is killed; within 10 s every
//!   container has exited and the pod is NotReady.
//! - `rel_vmm_01_vmm_sigkill`: the same for the VMM.
//! - `rel_agent_01_agent_hang`: the agent stops answering (the test guest
//!   image's fault switch; guest and VMM run on): the health check (1 s
//!   interval, 3 s deadline here) fails the pod within 10 s, and the VMM
//!   is killed.
//! - `rel_panic_01_guest_panic`: the guest kernel panics (sysrq 'c'): the
//!   VM ends (QEMU `-no-reboot`; on Cloud Hypervisor, which reboots, the
//!   health check notices the lost agent) and the pod fails within 10 s.
//!
//! - `a_create_past_its_deadline_leaves_nothing_in_the_guest`: the agent
//!   builds a container but answers after `agent_call_ms`: StartContainer
//!   fails DeadlineExceeded naming the setting, the container is removed
//!   in the guest (its cgroup, seen from a privileged container of the
//!   pod, goes), and the pod runs on.
//!
//! Run one at a time (`-- --test-threads=1`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, ContainerState, CriSetup, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr::{self, vm_processes};
use clh_tests::faults::{self, Fault, FaultSwitch};

const AGENT_TIMEOUT_MS: u64 = 120_000;
/// How soon the pod must be seen failed (REL-VMM-01: 10 s).
const DETECTION: Duration = Duration::from_secs(10);

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS)
}

/// [`setup`] on the test guest image (faults::setup).
fn setup_with_faults() -> (ctr::Setup, CriSetup) {
    let s = faults::setup().expect("shim setup with the test guest image");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS)
}

/// A pod of two sleepers; `program` (a process of its VM) is SIGKILLed;
/// every container must be EXITED and the pod NotReady within
/// [`DETECTION`]; then the pod's removal must leave nothing.
fn kill_and_watch(s: &ctr::Setup, cri: &CriSetup, program: &str) -> Result<()> {
    fail_and_watch(s, cri, |pod| {
        let victims = vm_processes(program, &s.state_dir.join(&pod.id));
        ensure!(!victims.is_empty(), "no {program} of pod {} found", pod.id);
        Ok(move || {
            for pid in victims {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .with_context(|| format!("killing {program} {pid}"))?;
            }
            Ok(())
        })
    })
}

/// A pod of two sleepers; `prepare` readies a fault (untimed), which then
/// breaks the pod; every container must be EXITED, the pod NotReady and
/// its VMM gone within [`DETECTION`]; then the pod's removal must leave
/// nothing.
fn fail_and_watch<F: FnOnce() -> Result<()>>(
    s: &ctr::Setup,
    cri: &CriSetup,
    prepare: impl FnOnce(&Pod) -> Result<F>,
) -> Result<()> {
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
    let vm_dir = s.state_dir.join(&pod.id);
    let fault = prepare(&pod)?;
    let killed = Instant::now();
    fault()?;
    for id in &ids {
        k.cri()
            .wait_container_state(id, ContainerState::ContainerExited, DETECTION)
            .with_context(|| format!("container {id} after the fault"))?;
    }
    k.cri()
        .wait_for("the pod NotReady", DETECTION, |c| {
            let ready = c.pod_sandbox_status(&pod.id)?.state;
            Ok((ready == k8s_cri::v1::PodSandboxState::SandboxNotready as i32).then_some(()))
        })
        .context("the pod's state after the kill")?;
    k.cri()
        .wait_for("the VMM to end", DETECTION, |_| {
            Ok(vm_processes("qemu-system-x86_64", &vm_dir)
                .is_empty()
                .then_some(()))
        })
        .context("the VMM after the fault")?;
    let failed = killed.elapsed();
    ensure!(
        failed < DETECTION + Duration::from_secs(2),
        "the pod took {failed:?} to fail"
    );
    let removed = Instant::now();
    k.remove_pod(&pod)?;
    // The figures docs/SPECIFICATION.md quotes.
    eprintln!(
        "fault to pod failed (containers EXITED, NotReady, VMM gone): {failed:?}; \
         StopPodSandbox + RemovePodSandbox to nothing left: {:?}",
        removed.elapsed()
    );
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

#[test]
fn rel_agent_01_agent_hang() {
    let (s, cri) = setup_with_faults();
    fail_and_watch(&s, &cri, |pod| {
        let switch = FaultSwitch::connect(&s.state_dir.join(&pod.id))?;
        Ok(move || switch.throw(Fault::HANG))
    })
    .unwrap();
}

#[test]
fn rel_panic_01_guest_panic() {
    let (s, cri) = setup_with_faults();
    fail_and_watch(&s, &cri, |pod| {
        let switch = FaultSwitch::connect(&s.state_dir.join(&pod.id))?;
        Ok(move || switch.throw(Fault::PANIC))
    })
    .unwrap();
}

/// `agent_call_ms` of the slow-create test, and how late the agent answers
/// CreateContainer there: well past it, so the container is built first.
const CALL_DEADLINE_MS: u64 = 6_000;
const CREATE_DELAY: Duration = Duration::from_secs(12);

/// The ids of the containers the guest has: its container cgroups, as a
/// privileged container of the pod (`watcher`, with no cgroup namespace of
/// its own) sees them.
fn guest_containers(k: &Kubelet, watcher: &str) -> Result<Vec<String>> {
    let out = k.sh(watcher, "ls /sys/fs/cgroup/clh")?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

#[test]
fn a_create_past_its_deadline_leaves_nothing_in_the_guest() {
    let (s, cri) = setup_with_faults();
    ctr::set_timeout(&s.config, "agent_call_ms", CALL_DEADLINE_MS).unwrap();
    slow_create(&s, &cri).unwrap();
}

fn slow_create(s: &ctr::Setup, cri: &CriSetup) -> Result<()> {
    let k = Kubelet::start(cri)?;
    let pod = k.run_pod(&k.pod("slow").privileged())?;
    let watcher = k.run_container(&pod, &ContainerBuilder::sleeper("watcher").privileged())?;
    k.cri()
        .wait_container_state(&watcher, ContainerState::ContainerRunning, k.timeout())?;
    let before = guest_containers(&k, &watcher)?;
    ensure!(
        before.contains(&watcher),
        "the guest's container cgroups do not show the watcher itself: {before:?}"
    );

    let switch = FaultSwitch::connect(&s.state_dir.join(&pod.id))?;
    switch.slow_create(CREATE_DELAY)?;
    let late = k.create_container(&pod, &ContainerBuilder::sleeper("late"))?;
    let asked = Instant::now();
    let err = match k.cri().start_container(&late) {
        Ok(()) => anyhow::bail!("a CreateContainer answered {CREATE_DELAY:?} late succeeded"),
        Err(e) => format!("{e:#}"),
    };
    let failed_after = asked.elapsed();
    for what in [
        "DeadlineExceeded",
        "CreateContainer within 6s",
        "agent_call_ms",
    ] {
        ensure!(err.contains(what), "{what:?} not in: {err}");
    }
    ensure!(
        failed_after < CREATE_DELAY,
        "StartContainer failed after {failed_after:?}, not at its deadline"
    );

    // Built, then removed once the agent's late answer found nobody.
    let mut seen = false;
    k.cri().wait_for(
        "the late container to go from the guest",
        CREATE_DELAY * 2,
        |_| {
            let now = guest_containers(&k, &watcher)?;
            seen |= now.contains(&late);
            Ok((seen && !now.contains(&late)).then_some(()))
        },
    )?;
    switch.slow_create(Duration::ZERO)?;

    // The pod runs on: a new container starts and answers.
    let after = k.run_container(&pod, &ContainerBuilder::sleeper("after"))?;
    k.cri()
        .wait_container_state(&after, ContainerState::ContainerRunning, k.timeout())?;
    ensure!(k.sh(&after, "echo ok")?.trim() == "ok");
    let now = guest_containers(&k, &watcher)?;
    ensure!(!now.contains(&late) && now.contains(&after), "{now:?}");
    k.cri().remove_container(&late)?;
    k.remove_pod(&pod)?;
    k.finish()
}
