//! containerd restarts under running `clh` pods, through CRI on real VMs
//! (issue 13; catalogue REL-CTRD-*).
//!
//! - `rel_ctrd_01_events_exec_attach_logs_after_a_containerd_restart`:
//!   containerd is restarted (SIGTERM, started again on the same state)
//!   while a pod of three containers runs. The shim and the VM are the
//!   same ones afterwards; ExecSync, Attach and the container log work; a
//!   container that then exits (code 7) is EXITED with that code and its
//!   TaskExit reaches containerd's event stream; a container then
//!   OOM-killed is EXITED 137 with reason OOMKilled, which CRI takes from
//!   the TaskOOM event only. Without the publisher's reconnect
//!   (service/events.rs) the events are lost: no TaskExit in the stream,
//!   reason "Error" instead of OOMKilled.
//! - `rel_ctrd_02_restart_during_a_container_create`: containerd is
//!   stopped while the shim's Create of a container (CRI StartContainer)
//!   is in flight: the guest is stopped with SIGSTOP so that the Create
//!   waits on the agent, and continued while containerd is down. containerd
//!   gives up on the task as it stops (Delete, then `<shim> delete`); the
//!   Create then ends without leaving anything (service/mod.rs `admit`
//!   undoes a Create deleted in flight). The interrupted container is
//!   removable (or already gone), its files and mounts go, the pod still
//!   runs its other container and a new one, with one VM; its removal
//!   leaves nothing.
//! - `rel_ctrd_02_restart_during_a_pod_boot`: containerd is restarted
//!   while RunPodSandbox boots the VM. The sandbox is then NotReady and
//!   removable, or was reaped; no VM or state is left either way.
//!
//! Every test ends with the harness's leak checks (shims, sockets, mounts,
//! cgroups, the shim's state dir). Run one at a time (`-- --test-threads=1`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::EventWatch;
use clh_tests::cri::{api, ContainerBuilder, ContainerState, Cri, CriSetup, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr::{self, vm_processes};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const AGENT_TIMEOUT_MS: u64 = 120_000;
/// Deadline of one exec'd command.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon an exit or OOM kill must show in CRI and in the event stream
/// once it happened in the guest.
const EVENT_DEADLINE: Duration = Duration::from_secs(20);
const QEMU: &str = "qemu-system-x86_64";
const MIB: i64 = 1024 * 1024;

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let shim_dir = ctr::shim_dir().expect("building the shim");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cri = ctr::cri_setup(&s, shim_dir, images, AGENT_TIMEOUT_MS).expect("CRI setup");
    (s, cri)
}

/// Prints one tick a second, and "after-restart" instead once /tmp/mark
/// exists: its log proves output written after the restart still lands.
fn ticker() -> ContainerBuilder {
    ContainerBuilder::new("ticker", BUSYBOX).shell(
        "while :; do if [ -e /tmp/mark ]; then echo after-restart; else echo tick; fi; sleep 1; done",
    )
}

/// Exits with 7 once /tmp/quit exists.
fn quitter() -> ContainerBuilder {
    ContainerBuilder::new("quitter", BUSYBOX)
        .shell("until [ -e /tmp/quit ]; do sleep 0.1; done; exit 7")
}

/// Goes over its 32 MiB limit once /tmp/go exists (allocating only when
/// told: a hog killed at its start can beat the OOM watch).
fn hog() -> ContainerBuilder {
    ContainerBuilder::new("hog", BUSYBOX)
        .shell("until [ -e /tmp/go ]; do sleep 0.05; done; exec dd if=/dev/zero of=/dev/null bs=64M count=1")
        .memory_limit(32 * MIB)
}

fn sleeper(name: &str) -> ContainerBuilder {
    ContainerBuilder::new(name, BUSYBOX).command(&["sleep", "100000"])
}

fn running(k: &Kubelet, ids: &[&str]) -> Result<()> {
    for id in ids {
        k.cri()
            .wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
    }
    Ok(())
}

/// The pod's VM directory under the shim's state root.
fn vm_dir(s: &ctr::Setup, pod: &Pod) -> PathBuf {
    s.state_dir.join(&pod.id)
}

/// The container's log as the CRI plugin writes it.
fn log_text(pod: &Pod, c: &ContainerBuilder) -> String {
    let path = pod.log_dir.join(c.name()).join("0.log");
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for `id` to be EXITED with a reason set, as containerd records it
/// once it handled the exit (and, for an OOM kill, the TaskOOM event).
fn exited(cri: &Cri, id: &str, reason: &str) -> Result<api::ContainerStatus> {
    let mut last = None;
    cri.wait_for(&format!("{id} EXITED ({reason})"), EVENT_DEADLINE, |c| {
        let s = c.container_status(id)?;
        let done = s.state == ContainerState::ContainerExited as i32 && s.reason == reason;
        last = Some(s.clone());
        Ok(done.then_some(s))
    })
    .with_context(|| format!("last status: {last:?}"))
}

#[test]
fn rel_ctrd_01_events_exec_attach_logs_after_a_containerd_restart() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        let pod = k.run_pod(&k.pod("restart"))?;
        let ids = [
            k.run_container(&pod, &ticker())?,
            k.run_container(&pod, &quitter())?,
            k.run_container(&pod, &hog())?,
        ];
        let [ticker_id, quitter_id, hog_id] = ids.clone();
        running(&k, &[&ticker_id, &quitter_id, &hog_id])?;
        let vms = vm_processes(QEMU, &vm_dir(&s, &pod));
        ensure!(vms.len() == 1, "VM processes before the restart: {vms:?}");
        let shims = k.containerd().shims();

        // Down for three of the ticker's periods: it writes while nobody
        // reads its output FIFO (the fault's length, not a wait).
        k.restart_containerd_then(|| std::thread::sleep(Duration::from_secs(3)))?;
        let events = EventWatch::start(k.containerd())?;
        ensure!(k.containerd().shims() == shims, "the shims changed");
        let after = vm_processes(QEMU, &vm_dir(&s, &pod));
        ensure!(after == vms, "VM processes {vms:?} became {after:?}");
        let cri = k.cri();
        let p = cri.pod_sandbox_status(&pod.id)?;
        ensure!(
            p.state == api::PodSandboxState::SandboxReady as i32,
            "{p:?}"
        );

        // Exec, attach and logs.
        let r = cri.exec_sync(&ticker_id, &["echo", "still here"], EXEC_TIMEOUT)?;
        ensure!(r.stdout == "still here\n" && r.exit_code == 0, "{r:?}");
        let url = cri.attach_url(&ticker_id)?;
        let a = cri.stream(&url, None, Some("tick"), EXEC_TIMEOUT)?;
        ensure!(a.stdout.contains("tick"), "attach: {a:?}");
        k.sh(&ticker_id, "touch /tmp/mark")?;
        cri.wait_for(
            "the log line written after the restart",
            EVENT_DEADLINE,
            |_| {
                Ok(log_text(&pod, &ticker())
                    .contains("after-restart")
                    .then_some(()))
            },
        )?;

        // TaskExit: CRI shows the exit (it also learns it from Wait), and
        // the event itself reaches containerd.
        let t = Instant::now();
        k.sh(&quitter_id, "touch /tmp/quit")?;
        let st = exited(cri, &quitter_id, "Error")?;
        ensure!(st.exit_code == 7, "{st:?}");
        events.wait_topic("/tasks/exit", &quitter_id, EVENT_DEADLINE)?;
        eprintln!(
            "REL-CTRD-01: TaskExit seen {:?} after the exit was asked for",
            t.elapsed()
        );

        // TaskOOM: the reason comes from the event alone.
        let t = Instant::now();
        k.sh(&hog_id, "touch /tmp/go")?;
        let st = exited(cri, &hog_id, "OOMKilled")?;
        ensure!(st.exit_code == 137, "{st:?}");
        events.wait_topic("/tasks/oom", &hog_id, EVENT_DEADLINE)?;
        eprintln!(
            "REL-CTRD-01: OOMKilled seen {:?} after the hog started",
            t.elapsed()
        );

        // The pod is still whole: its remaining container answers.
        let r = cri.exec_sync(&ticker_id, &["true"], EXEC_TIMEOUT)?;
        ensure!(r.exit_code == 0, "{r:?}");
        k.remove_pod(&pod)?;
        k.finish()
    };
    run().unwrap();
}

/// SIGSTOP or SIGCONT to every process of `program` of the VM in `dir`.
fn signal_vm(program: &str, dir: &Path, signal: Signal) -> Result<()> {
    let pids = vm_processes(program, dir);
    ensure!(!pids.is_empty(), "no {program} for {}", dir.display());
    for pid in pids {
        kill(Pid::from_raw(pid), signal).with_context(|| format!("{signal} to {pid}"))?;
    }
    Ok(())
}

/// Whether something was mounted under `dir` (a container's rootfs: the
/// shim's Create has begun).
fn mounted_under(dir: &Path) -> bool {
    let needle = format!(" {}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&needle) && l.contains("/rootfs"))
}

#[test]
fn rel_ctrd_02_restart_during_a_container_create() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        let pod = k.run_pod(&k.pod("midcreate"))?;
        let first = k.run_container(&pod, &sleeper("first"))?;
        running(&k, &[&first])?;
        let dir = vm_dir(&s, &pod);
        let late = k.create_container(&pod, &sleeper("late"))?;
        let private = dir.join("private").join(&late);

        // A stopped guest holds the shim's Create at the agent.
        signal_vm(QEMU, &dir, Signal::SIGSTOP)?;
        let start_late = late.clone();
        let t = Instant::now();
        let outcome = k.restart_containerd_during(
            move |cri| cri.start_container(&start_late),
            || mounted_under(&private),
            k.timeout(),
            || {
                let _ = signal_vm(QEMU, &dir, Signal::SIGCONT);
            },
        );
        // Never leave the guest stopped, whatever happened.
        let _ = signal_vm(QEMU, &vm_dir(&s, &pod), Signal::SIGCONT);
        let outcome = outcome?;
        eprintln!(
            "REL-CTRD-02: StartContainer interrupted by the restart: {:?} after {:?}",
            outcome.as_ref().err().map(|e| format!("{e:#}")),
            t.elapsed()
        );

        // The kubelet's view: the container is gone, or removable.
        let cri = k.cri();
        let listed = cri.list_containers(Some(&pod.id))?;
        if let Some(c) = listed.iter().find(|c| c.id == late) {
            eprintln!("REL-CTRD-02: the interrupted container is {:?}", c.state());
            if c.state() == ContainerState::ContainerRunning {
                cri.stop_container(&late, Duration::from_secs(1))?;
            }
            cri.remove_container(&late)?;
        }
        ensure!(
            !cri.list_containers(Some(&pod.id))?
                .iter()
                .any(|c| c.id == late),
            "the interrupted container is still listed"
        );
        let late_dir = vm_dir(&s, &pod).join("private").join(&late);
        cri.wait_for(
            "the interrupted container's files to go",
            EVENT_DEADLINE,
            |_| Ok((!late_dir.exists() && !mounted_under(&late_dir)).then_some(())),
        )?;
        // The pod still works: its first container, and a new one.
        let r = cri
            .exec_sync(&first, &["true"], EXEC_TIMEOUT)
            .with_context(|| k.containerd().log_tail(150))?;
        ensure!(r.exit_code == 0, "{r:?}");
        let again = k.run_container(&pod, &sleeper("late").attempt(1))?;
        running(&k, &[&again])?;
        let vms = vm_processes(QEMU, &vm_dir(&s, &pod));
        ensure!(vms.len() == 1, "VM processes of the pod: {vms:?}");
        k.remove_pod(&pod)?;
        k.finish()
    };
    run().unwrap();
}

/// A directory in `root` that is not in `before`.
fn new_entry(root: &Path, before: &[PathBuf]) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| !before.contains(p))
}

#[test]
fn rel_ctrd_02_restart_during_a_pod_boot() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        std::fs::create_dir_all(&s.state_dir)?;
        let mut k = Kubelet::start(&cri)?;
        let mut pod = k.prepare_pod(&k.pod("midboot"))?;
        let config = pod.config.clone();
        let before: Vec<PathBuf> = std::fs::read_dir(&s.state_dir)?
            .flatten()
            .map(|e| e.path())
            .collect();
        let root = s.state_dir.clone();
        // The VM boots once its VMM runs: restart then, mid-boot.
        let booting =
            || new_entry(&root, &before).is_some_and(|d| !vm_processes(QEMU, &d).is_empty());
        let t = Instant::now();
        let outcome = k.restart_containerd_during(
            move |cri| cri.run_pod_sandbox(&config, "clh"),
            booting,
            k.timeout(),
            || {},
        )?;
        eprintln!(
            "REL-CTRD-02: RunPodSandbox interrupted by the restart: {:?} after {:?}",
            outcome.as_ref().err().map(|e| format!("{e:#}")),
            t.elapsed()
        );
        let cri = k.cri();
        let name = pod.config.metadata.as_ref().map(|m| m.name.clone());
        let found = cri
            .list_pod_sandbox()?
            .into_iter()
            .find(|p| p.metadata.as_ref().map(|m| m.name.clone()) == name);
        match found {
            Some(p) => {
                eprintln!("REL-CTRD-02: the interrupted pod is {:?}", p.state());
                k.track_pod(&mut pod, p.id);
                k.remove_pod(&pod)?;
            }
            None => k.discard_prepared(&pod),
        }
        // No orphan VM: nothing under the state root runs or remains.
        cri.wait_for("the interrupted pod's VM to go", k.timeout(), |_| {
            Ok(ctr::state_dir_leaks(&s.state_dir).is_empty().then_some(()))
        })
        .with_context(|| format!("left: {:#?}", ctr::state_dir_leaks(&s.state_dir)))?;
        // A pod runs again.
        let again = k.run_pod(&k.pod("midboot").attempt(1))?;
        let c = k.run_container(&again, &sleeper("c"))?;
        running(&k, &[&c])?;
        k.remove_pod(&again)?;
        k.finish()
    };
    run().unwrap();
}
