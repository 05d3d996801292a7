//! End-to-end scenarios through the CRI, generic over the runtime handler:
//! each starts its own [`Kubelet`] (a private containerd) from a
//! [`CriSetup`], runs what a kubelet would, checks the outcome, removes its
//! pods and fails on anything left behind. tests/tests/cri_runc.rs runs
//! them with `runc` as the baseline; a VM runtime's test runs the same ones
//! with its handler and adds its own assertions on what they return.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::{
    ContainerBuilder, ContainerState, Cri, CriSetup, Kubelet, Resources, Seccomp, BUSYBOX,
};

/// (j) to (l): pod sysctls, read-only volumes with submounts, mount
/// propagation (runc_parity.rs).
pub use super::runc_parity::{
    mount_propagation, pod_sysctls, read_only_submounts, Bidirectional, HOST_SYSCTL,
};

/// SIGPIPE (13) in a /proc/<pid>/status signal mask.
const SIGPIPE_BIT: u64 = 1 << (13 - 1);

/// Deadline of one exec'd command.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

const MIB: i64 = 1024 * 1024;

/// `cat /proc/sys/kernel/random/boot_id` in container `id`: containers of
/// one VM share the guest's, runc containers share the host's.
pub fn boot_id(cri: &Cri, id: &str) -> Result<String> {
    let r = cri.exec_sync(
        id,
        &["cat", "/proc/sys/kernel/random/boot_id"],
        EXEC_TIMEOUT,
    )?;
    ensure!(r.exit_code == 0, "reading boot_id in {id}: {r:?}");
    Ok(r.stdout.trim().to_owned())
}

/// What [`two_containers`] saw, for handler-specific assertions.
#[derive(Debug, Clone)]
pub struct TwoContainers {
    /// The kernel boot id read in each of the two containers.
    pub boot_ids: [String; 2],
}

/// (a) A pod with two containers: both run, ExecSync in each returns the
/// command's stdout, stderr and exit code, and their processes do not
/// ignore SIGPIPE; returns their boot ids.
pub fn two_containers(setup: &CriSetup) -> Result<TwoContainers> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("two"))?;
    // The address comes from our loopback-only CNI network.
    let status = cri.pod_sandbox_status(&pod.id)?;
    let ip = status.network.as_ref().map(|n| n.ip.as_str());
    ensure!(ip == Some("127.0.0.1"), "pod IP {ip:?}");
    let ids = [
        k.run_container(&pod, &ContainerBuilder::sleeper("first"))?,
        k.run_container(&pod, &ContainerBuilder::sleeper("second"))?,
    ];
    for id in &ids {
        cri.wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
        let r = cri.exec_sync(id, &["sh", "-c", "echo hi; exit 3"], EXEC_TIMEOUT)?;
        ensure!(
            r.stdout == "hi\n" && r.exit_code == 3,
            "exec in {id}: {r:?}"
        );
        let r = cri.exec_sync(id, &["sh", "-c", "echo oops >&2"], EXEC_TIMEOUT)?;
        ensure!(
            r.stderr == "oops\n" && r.stdout.is_empty() && r.exit_code == 0,
            "{r:?}"
        );
        // Processes start with SIGPIPE not ignored, as runc starts them: a
        // writer whose reader left dies of it, silently.
        let sigpipe = "grep SigIgn /proc/1/status /proc/self/status; yes | head -c 1 >/dev/null";
        let r = cri.exec_sync(id, &["sh", "-c", sigpipe], EXEC_TIMEOUT)?;
        let ignored: Vec<bool> = (r.stdout.lines())
            .filter_map(|l| l.split('\t').nth(1))
            .map(|mask| u64::from_str_radix(mask, 16).map(|m| m & SIGPIPE_BIT != 0))
            .collect::<Result<_, _>>()?;
        ensure!(
            ignored == [false; 2] && r.stderr.is_empty(),
            "SIGPIPE ignored in {id}'s init or exec: {r:?}"
        );
    }
    let listed = cri.list_containers(Some(&pod.id))?;
    ensure!(
        ids.iter().all(|id| listed.iter().any(|c| &c.id == id)),
        "{ids:?} not all listed in {listed:?}"
    );
    let boot_ids = [boot_id(cri, &ids[0])?, boot_id(cri, &ids[1])?];
    k.remove_pod(&pod)?;
    k.finish()?;
    Ok(TwoContainers { boot_ids })
}

/// (b) ContainerStats and ListContainerStats report non-zero CPU usage and
/// memory working set for a container that has done some work.
pub fn container_stats(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("stats"))?;
    let busy = ContainerBuilder::new("busy", BUSYBOX)
        .shell("i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done; exec sleep 100000");
    let id = k.run_container(&pod, &busy)?;
    cri.wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
    let nonzero = |s: &super::api::ContainerStats| {
        let cpu = s
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref());
        let mem = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref());
        cpu.is_some_and(|v| v.value > 0) && mem.is_some_and(|v| v.value > 0)
    };
    let mut last = None;
    cri.wait_for("non-zero ContainerStats", k.timeout(), |c| {
        let s = c.container_stats(&id)?;
        let ok = nonzero(&s);
        last = Some(s);
        Ok(ok.then_some(()))
    })
    .with_context(|| format!("last: {last:?}"))?;
    for pod_filter in [Some(pod.id.as_str()), None] {
        let all = cri.list_container_stats(pod_filter)?;
        let s = all
            .iter()
            .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == id))
            .with_context(|| format!("{id} not in ListContainerStats({pod_filter:?}): {all:?}"))?;
        ensure!(nonzero(s), "ListContainerStats({pod_filter:?}): {s:?}");
    }
    k.remove_pod(&pod)?;
    k.finish()
}

/// (c) A container over its memory limit (32 MiB; dd allocates a 64 MiB
/// buffer) is killed: EXITED, exit code 137, reason "OOMKilled".
///
/// The hog allocates only once told to (an exec creates /tmp/go), after
/// the container is running: a hog killed within milliseconds of its start
/// can beat the runtime's OOM watch (runc's shim on cgroup v1 registers
/// its eventfd after the start), and containerd then never learns why.
pub fn oom_killed(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("oom"))?;
    let hog = ContainerBuilder::new("hog", BUSYBOX)
        .command(&[
            "sh",
            "-c",
            "until [ -e /tmp/go ]; do sleep 0.05; done; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
        ])
        .memory_limit(32 * MIB);
    let id = k.run_container(&pod, &hog)?;
    cri.wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
    cri.exec_sync(&id, &["touch", "/tmp/go"], k.timeout())?;
    cri.wait_container_state(&id, ContainerState::ContainerExited, k.timeout())?;
    // containerd records the reason from the TaskOOM event, which may be
    // handled just after the exit.
    let mut last = None;
    let status = cri
        .wait_for("reason OOMKilled", Duration::from_secs(10), |c| {
            let s = c.container_status(&id)?;
            let done = s.reason == "OOMKilled";
            last = Some(s.clone());
            Ok(done.then_some(s))
        })
        .with_context(|| format!("last status: {last:?}"))?;
    ensure!(status.exit_code == 137, "exit code: {status:?}");
    k.remove_pod(&pod)?;
    k.finish()
}

/// A container whose shell traps SIGTERM with `action`, then signals
/// readiness with /tmp/ready, then waits.
fn trapper(name: &str, action: &str) -> ContainerBuilder {
    let script = format!("trap '{action}' TERM; touch /tmp/ready; while :; do sleep 1; done");
    ContainerBuilder::new(name, BUSYBOX).shell(&script)
}

/// Waits for `id`'s trap to be in place (its /tmp/ready).
fn wait_trap(k: &Kubelet, id: &str) -> Result<()> {
    k.cri()
        .wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
    k.cri().wait_for(&format!("{id}'s trap"), k.timeout(), |c| {
        let r = c.exec_sync(id, &["test", "-e", "/tmp/ready"], EXEC_TIMEOUT)?;
        Ok((r.exit_code == 0).then_some(()))
    })
}

/// (d) StopContainer honours the grace period: a container ignoring
/// SIGTERM is killed once 3 s have passed (exit 137); one handling it
/// exits at once with its own status.
pub fn stop_grace_period(setup: &CriSetup) -> Result<()> {
    const GRACE: Duration = Duration::from_secs(3);
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("grace"))?;
    let stubborn = k.run_container(&pod, &trapper("stubborn", ""))?;
    let polite = k.run_container(&pod, &trapper("polite", "exit 0"))?;
    wait_trap(&k, &stubborn)?;
    wait_trap(&k, &polite)?;

    let t = Instant::now();
    cri.stop_container(&stubborn, GRACE)?;
    let took = t.elapsed();
    let s = cri.container_status(&stubborn)?;
    // 100 ms of slack: containerd's timer and our clock start apart.
    ensure!(
        took + Duration::from_millis(100) >= GRACE,
        "stopped after {took:?}"
    );
    ensure!(
        took < GRACE + Duration::from_secs(15),
        "stopped after {took:?}"
    );
    ensure!(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code == 137,
        "{s:?}"
    );

    let t = Instant::now();
    cri.stop_container(&polite, Duration::from_secs(30))?;
    let took = t.elapsed();
    let s = cri.container_status(&polite)?;
    ensure!(took < Duration::from_secs(10), "polite stop took {took:?}");
    ensure!(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code == 0,
        "{s:?}"
    );
    for id in [&stubborn, &polite] {
        cri.remove_container(id)?;
    }
    ensure!(
        cri.list_containers(Some(&pod.id))?.is_empty(),
        "containers left"
    );
    k.remove_pod(&pod)?;
    k.finish()
}

/// (e) StopPodSandbox and RemovePodSandbox on a pod whose containers still
/// run leave nothing: no shim, socket, mount, netns, cgroup, CNI cache
/// entry. The pod carries pod-level resources, which containerd must pass
/// to the runtime as the sandbox spec's annotations.
pub fn remove_running_pod(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let resources = Resources {
        memory_limit_bytes: 256 * MIB,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        cpu_shares: 512,
    };
    let pod = k.run_pod(&k.pod("doomed").resources(resources))?;
    let spec = sandbox_annotations(&k, &pod.id)?;
    for (key, want) in [
        ("io.kubernetes.cri.sandbox-memory", "268435456"),
        ("io.kubernetes.cri.sandbox-cpu-quota", "50000"),
        ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
        ("io.kubernetes.cri.sandbox-cpu-shares", "512"),
    ] {
        let got = spec.get(key).and_then(|v| v.as_str());
        ensure!(got == Some(want), "annotation {key}: {got:?} in {spec}");
    }
    let ids = [
        k.run_container(&pod, &ContainerBuilder::sleeper("one"))?,
        k.run_container(&pod, &ContainerBuilder::sleeper("two"))?,
    ];
    for id in &ids {
        cri.wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
    }
    // The leak check must see a running pod, or its silence proves nothing.
    let running = k.leak_report();
    for what in ["pod ", "shim process ", "socket ", "left in "] {
        ensure!(
            running.iter().any(|l| l.starts_with(what)),
            "no {what:?} seen while the pod runs: {running:#?}"
        );
    }
    k.remove_pod(&pod)?;
    k.finish()
}

/// The OCI spec annotations of the sandbox `pod_id` as containerd stored
/// them (`ctr containers info`), i.e. what the runtime was given.
fn sandbox_annotations(k: &Kubelet, pod_id: &str) -> Result<serde_json::Value> {
    let ctd = k.containerd();
    let args = ["containers", "info", pod_id];
    let out = ctd.ctr_in(crate::containerd::CRI_NAMESPACE, &args, k.timeout())?;
    crate::containerd::check(&out, "ctr containers info")?;
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing ctr containers info")?;
    Ok(info["Spec"]["annotations"].clone())
}

/// (f) Five pods run, exec and are removed in parallel.
pub fn parallel_pods(setup: &CriSetup) -> Result<()> {
    const PODS: usize = 5;
    let k = Kubelet::start(setup)?;
    let one = |i: usize| -> Result<()> {
        let pod = k.run_pod(&k.pod(&format!("par{i}")))?;
        let id = k.run_container(&pod, &ContainerBuilder::sleeper("c"))?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        let r = k
            .cri()
            .exec_sync(&id, &["echo", &format!("pod {i}")], EXEC_TIMEOUT)?;
        ensure!(
            r.stdout == format!("pod {i}\n") && r.exit_code == 0,
            "{r:?}"
        );
        k.remove_pod(&pod)
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS).map(|i| s.spawn(move || one(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("pod thread panicked")))
            })
            .collect()
    });
    let errors: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("pod {i}: {e:#}")))
        .collect();
    ensure!(errors.is_empty(), "{errors:#?}");
    k.finish()
}

/// (g) containerd restarted (SIGTERM, start on the same state) while a pod
/// runs: the shims kept running, the pod and its container are still
/// listed and running, ExecSync works, and the pod is removed cleanly.
pub fn containerd_restart(setup: &CriSetup) -> Result<()> {
    let mut k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("survivor"))?;
    let id = k.run_container(&pod, &ContainerBuilder::sleeper("c"))?;
    k.cri()
        .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
    let shims = k.containerd().shims();
    ensure!(!shims.is_empty(), "no shim process found");

    k.restart_containerd()?;
    ensure!(
        k.containerd().shims() == shims,
        "the shims changed across the restart"
    );
    let cri = k.cri();
    let pods = cri.list_pod_sandbox()?;
    let p = pods
        .iter()
        .find(|p| p.id == pod.id)
        .with_context(|| format!("pod not listed after the restart: {pods:?}"))?;
    ensure!(
        p.state == super::api::PodSandboxState::SandboxReady as i32,
        "{p:?}"
    );
    let listed = cri.list_containers(Some(&pod.id))?;
    let c = listed
        .iter()
        .find(|c| c.id == id)
        .with_context(|| format!("container not listed after the restart: {listed:?}"))?;
    ensure!(c.state == ContainerState::ContainerRunning as i32, "{c:?}");
    let r = cri.exec_sync(&id, &["sh", "-c", "echo still here"], EXEC_TIMEOUT)?;
    ensure!(r.stdout == "still here\n" && r.exit_code == 0, "{r:?}");
    k.remove_pod(&pod)?;
    k.finish()
}

/// (h) Streaming Exec (stdout, stderr, stdin and the exit status) and
/// Attach through containerd's streaming server, as `kubectl exec` and
/// `kubectl attach` reach them.
pub fn streaming(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("stream"))?;
    let ticker =
        ContainerBuilder::new("ticker", BUSYBOX).shell("while true; do echo tick; sleep 1; done");
    let id = k.run_container(&pod, &ticker)?;
    cri.wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;

    let url = cri.exec_url(&id, &["sh", "-c", "echo out; echo err >&2; exit 5"], false)?;
    let s = cri.stream(&url, None, None, EXEC_TIMEOUT)?;
    ensure!(s.stdout == "out\n" && s.stderr == "err\n", "exec: {s:?}");
    ensure!(
        s.status.contains("Failure") && s.status.contains("\"5\""),
        "exec status: {s:?}"
    );
    let url = cri.exec_url(&id, &["head", "-n", "1"], true)?;
    let s = cri.stream(&url, Some(b"round trip\n"), None, EXEC_TIMEOUT)?;
    ensure!(s.stdout == "round trip\n", "exec with stdin: {s:?}");
    ensure!(s.status.contains("Success"), "exec status: {s:?}");

    let url = cri.attach_url(&id)?;
    let s = cri.stream(&url, None, Some("tick"), EXEC_TIMEOUT)?;
    ensure!(s.stdout.contains("tick"), "attach: {s:?}");
    k.remove_pod(&pod)?;
    k.finish()
}

/// The errno our Localhost profile returns for mkdir: ENOSYS, which no
/// permission check gives, so a denial can only come from the filter.
const DENIED_ERRNO: u32 = 38;
/// How busybox reports [`DENIED_ERRNO`].
const DENIED_TEXT: &str = "Function not implemented";

/// A Localhost seccomp profile: everything allowed but mkdir.
fn mkdir_denying_profile() -> serde_json::Value {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{
            "names": ["mkdir", "mkdirat"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": DENIED_ERRNO,
        }]
    })
}

/// What a seccomp container's init recorded and an exec in it sees.
const SECCOMP_PROBE: &str = "grep '^Seccomp:' /proc/self/status > /tmp/init-mode; \
     mkdir /tmp/init-dir 2> /tmp/init-mkdir; touch /tmp/probed; exec sleep 100000";

/// `(init, exec)` results of `script`: the init's from the files
/// [`SECCOMP_PROBE`] wrote, the exec's from running `script` itself.
fn init_and_exec(cri: &Cri, id: &str, file: &str, script: &str) -> Result<(String, String)> {
    let init = cri.exec_sync(id, &["cat", file], EXEC_TIMEOUT)?;
    ensure!(init.exit_code == 0, "reading {file} in {id}: {init:?}");
    let exec = cri.exec_sync(id, &["sh", "-c", script], EXEC_TIMEOUT)?;
    Ok((init.stdout.trim().to_owned(), exec.stdout.trim().to_owned()))
}

/// (i) Seccomp profiles from the CRI config are enforced, in the
/// container's init and in processes exec'd into it: `RuntimeDefault`
/// puts both in filter mode (`Seccomp: 2`); a `Localhost` profile (a file
/// on the node) that denies mkdir with ENOSYS makes mkdir fail with that
/// errno in both; an unconfined container beside them makes directories
/// and has no filter (the canary that proves the profile did it).
pub fn seccomp_profiles(setup: &CriSetup) -> Result<()> {
    let profiles = tempfile::tempdir()?;
    let profile = profiles.path().join("deny-mkdir.json");
    std::fs::write(&profile, serde_json::to_vec(&mkdir_denying_profile())?)?;
    let profile = profile.to_str().context("profile path")?.to_owned();

    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("seccomp"))?;
    let probe = |name: &str| ContainerBuilder::new(name, BUSYBOX).shell(SECCOMP_PROBE);
    let default = k.run_container(&pod, &probe("default").seccomp(Seccomp::RuntimeDefault))?;
    let local = k.run_container(&pod, &probe("local").seccomp(Seccomp::Localhost(profile)))?;
    let unconfined = k.run_container(&pod, &probe("unconfined"))?;
    for id in [&default, &local, &unconfined] {
        cri.wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
        // The probe's files are written before it sleeps.
        cri.wait_for(&format!("{id}'s probe"), k.timeout(), |c| {
            let r = c.exec_sync(id, &["test", "-e", "/tmp/probed"], EXEC_TIMEOUT)?;
            Ok((r.exit_code == 0).then_some(()))
        })?;
    }
    let mode = "grep '^Seccomp:' /proc/self/status | tr -d ' \\t'";
    let mkdir = "mkdir /tmp/exec-dir 2>&1 && echo made";
    let modes = |id: &str| -> Result<(String, String)> {
        let (init, exec) = init_and_exec(cri, id, "/tmp/init-mode", mode)?;
        Ok((init.replace(['\t', ' '], ""), exec))
    };
    let expect = |id: &str, want: &str| -> Result<()> {
        let seen = modes(id)?;
        ensure!(
            seen == (want.to_owned(), want.to_owned()),
            "{id}: (init, exec) {seen:?}, want {want}"
        );
        Ok(())
    };
    expect(&default, "Seccomp:2")?;
    expect(&local, "Seccomp:2")?;
    expect(&unconfined, "Seccomp:0")?;

    let (init, exec) = init_and_exec(cri, &local, "/tmp/init-mkdir", mkdir)?;
    ensure!(
        init.contains(DENIED_TEXT) && exec.contains(DENIED_TEXT),
        "mkdir under the Localhost profile: init {init:?}, exec {exec:?}"
    );
    let (init, exec) = init_and_exec(cri, &unconfined, "/tmp/init-mkdir", mkdir)?;
    ensure!(
        init.is_empty() && exec == "made",
        "mkdir unconfined: init {init:?}, exec {exec:?}"
    );
    k.remove_pod(&pod)?;
    k.finish()
}

/// Bytes the container of [`large_output`] writes.
pub const LARGE_OUTPUT: u64 = 50 * 1024 * 1024;
/// containerd is frozen for this long once all but [`FROZEN_AT`] bytes of
/// the output are in the log: longer than the shim's former fixed drain
/// deadline (2 s), far shorter than a reader it would give up on.
const FREEZE: Duration = Duration::from_secs(5);
/// Less than the buffers between the process and containerd hold, so the
/// process exits while containerd is frozen with this much unread.
const FROZEN_AT: u64 = 320 * 1024;
/// A log line's bytes beside its 64 of output, `<time> stdout F `, on
/// average: the time has up to 30 bytes (RFC 3339 with nanoseconds, whose
/// trailing zeros are dropped: one time in ten is a byte shorter).
const LOG_LINE_OVERHEAD: f64 = 39.9;

/// A container writes 50 MiB to stdout and exits at once, while containerd,
/// busy, reads nothing for a while (SIGSTOP for [`FREEZE`] near the end):
/// its log file holds every byte, in order, in CRI's format (`<time>
/// stdout F <line>`), and its exit code is 0. The log is read once it
/// stops growing: a runtime that reported the exit with output still
/// buffered has lost that tail for good.
pub fn large_output(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let cri = k.cri();
    let pod = k.run_pod(&k.pod("output"))?;
    let big = ContainerBuilder::new("big", BUSYBOX).shell(&crate::output::script(LARGE_OUTPUT));
    let log = pod.log_dir.join("big").join("0.log");
    let id = k.run_container(&pod, &big)?;
    let line = crate::output::LINE.len() as f64 + 1.0;
    let lines = (LARGE_OUTPUT - FROZEN_AT) as f64 / line;
    let freeze_at = (lines * (line + LOG_LINE_OVERHEAD)) as u64;
    let pid = k.containerd().pid().context("containerd is not running")?;
    let pid = i32::try_from(pid)?;
    let deadline = Instant::now() + k.timeout();
    while log_size(&log) < freeze_at {
        ensure!(
            Instant::now() < deadline,
            "the log never reached {freeze_at} bytes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    freeze(pid, FREEZE)?;
    let status = cri.wait_container_state(&id, ContainerState::ContainerExited, k.timeout())?;
    ensure!(status.exit_code == 0, "exit: {status:?}");
    // containerd may still be writing what it read before the exit.
    let (mut size, mut since) = (0, Instant::now());
    while since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
        let now = log_size(&log);
        if now != size {
            (size, since) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut checker = crate::output::Checker::default();
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(4, |b| *b == b' ');
        let (_, stream, tag, content) = (parts.next(), parts.next(), parts.next(), parts.next());
        ensure!(
            stream == Some(b"stdout".as_slice()),
            "a log line not from stdout: {:?}",
            String::from_utf8_lossy(line)
        );
        checker.feed(content.unwrap_or_default());
        if tag == Some(b"F".as_slice()) {
            checker.feed(b"\n");
        }
    }
    checker
        .verify(LARGE_OUTPUT)
        .with_context(|| format!("the log {}", log.display()))?;
    k.remove_pod(&pod)?;
    k.finish()
}

fn log_size(log: &std::path::Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// Stops process `pid` for `period`; it is continued even if waiting fails.
fn freeze(pid: i32, period: Duration) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    kill(pid, Signal::SIGSTOP).context("stopping containerd")?;
    std::thread::sleep(period);
    kill(pid, Signal::SIGCONT).context("continuing containerd")
}
