//! A container attacking its own VM's agent and host side, through CRI with
//! the `clh` handler, a real guest and real VMMs:
//!
//! - `sec_sock_03_04_containers_reach_no_vsock_listener` (SEC-SOCK-03,
//!   SEC-SOCK-04): a privileged container, an unconfined one and one under
//!   containerd's default seccomp profile try AF_VSOCK connections to the
//!   agent's ports (1024 ttrpc, 1025 stdio, 1026 port forward) on the
//!   hypervisor's CID, the loopback CID, the host's and the guest's own,
//!   and to sampled host ports. None may stay open or answer: the guest
//!   kernel has no vsock loopback, the host side binds no `<uds>_<port>`
//!   listener, and the agent drops peers other than CID 2.
//! - `sec_agent_02_a_cwd_in_a_leaked_fd_stays_in_the_rootfs`
//!   (CVE-2024-21626): containers whose `workingDir` is `/proc/self/fd/N`
//!   for N = 3..16 either fail to start or find, walking `..` from their
//!   cwd, their own root; never the guest's root (where the agent lives).
//! - `sec_agent_02_an_exec_cwd_in_a_leaked_fd_stays_in_the_rootfs`: the
//!   same for processes exec'd into a running container (`ctr task exec
//!   --cwd`, which CRI cannot send): the agent's own exec path.
//!
//! Each ends with the CRI and shim leak checks. Run one at a time
//! (`-- --test-threads=1`): each boots a VM.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::ContainerdVersion;
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet, Seccomp, BUSYBOX};
use clh_tests::{build_static_helper, ctr};

const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The shim's setup (kept alive: it owns the state dirs) and CRI's.
fn cri_setup() -> (ctr::Setup, CriSetup) {
    ctr::default_cri_test_setup(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// Every target the probe tries: the agent's three ports on every CID a
/// container could name for "this machine" or "the host", and ports a
/// host service could listen on.
fn vsock_targets() -> Vec<String> {
    let mut targets = Vec::new();
    // 3: the guest's own (every VM has its own vsock device, always CID 3).
    for cid in [0, 1, 2, 3] {
        for port in [1024, 1025, 1026] {
            targets.push(format!("{cid}:{port}"));
        }
    }
    for port in [1, 22, 80, 443, 1027, 2375, 6443, 10250, 65535] {
        targets.push(format!("2:{port}"));
    }
    targets
}

#[test]
fn sec_sock_03_04_containers_reach_no_vsock_listener() {
    let (_shim, cri) = cri_setup();
    vsock_probes(&cri).unwrap();
}

fn vsock_probes(setup: &CriSetup) -> Result<()> {
    let tools = tempfile::tempdir()?;
    build_static_helper("vsock-probe", &tools.path().join("vsock-probe"))?;
    let tools_dir = tools.path().to_string_lossy().into_owned();

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("vsock-attack").privileged())?;
    let containers = [
        (
            "privileged",
            ContainerBuilder::sleeper("privileged").privileged(),
        ),
        ("unconfined", ContainerBuilder::sleeper("unconfined")),
        (
            "runtime-default",
            ContainerBuilder::sleeper("runtime-default").seccomp(Seccomp::RuntimeDefault),
        ),
    ];
    let targets = vsock_targets();
    let mut command = vec!["/tools/vsock-probe"];
    command.extend(targets.iter().map(String::as_str));
    for (what, container) in containers {
        let id = k.run_container(&pod, &container.mount(&tools_dir, "/tools", true))?;
        let r = k.cri().exec_sync(&id, &command, EXEC_TIMEOUT)?;
        println!("{what}:\n{}{}", r.stdout, r.stderr);
        ensure!(r.exit_code == 0, "the probe failed in {what}: {r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        ensure!(
            lines.len() == targets.len(),
            "{what}: {} verdicts for {} targets: {r:?}",
            lines.len(),
            targets.len()
        );
        let reached: Vec<&&str> = lines
            .iter()
            .filter(|l| l.ends_with(" OPEN") || l.ends_with(" ANSWERED"))
            .collect();
        ensure!(
            reached.is_empty(),
            "a {what} container reached a vsock listener: {reached:?}"
        );
    }
    k.remove_pod(&pod)?;
    k.finish()
}

/// What a container prints of the directory it reaches by walking `..`
/// from its cwd (at most 32 steps, each refusing to follow a link), then
/// `END`.
const WALK_UP: &str = "i=0; while [ $i -lt 32 ]; do cd -P .. || break; i=$((i+1)); done; \
                       echo \"root: $(ls -a | tr '\\n' ' ')\"; echo END";

#[test]
fn sec_agent_02_a_cwd_in_a_leaked_fd_stays_in_the_rootfs() {
    let (_shim, cri) = cri_setup();
    leaked_fd_cwd(&cri).unwrap();
}

fn leaked_fd_cwd(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("cwd-attack"))?;
    let own_root = walk_up_from(&k, &pod, "control", "/")?
        .context("the control container (workingDir /) did not start")?;
    ensure!(
        !own_root.contains(" init "),
        "the image's root has an `init`, the canary of the guest's root: {own_root}"
    );
    let mut outcomes = Vec::new();
    for fd in 3..=16 {
        let dir = format!("/proc/self/fd/{fd}");
        match walk_up_from(&k, &pod, &format!("fd{fd}"), &dir)? {
            None => outcomes.push(format!("{dir}: refused")),
            Some(root) => {
                ensure!(
                    root == own_root,
                    "a container with workingDir {dir} reached another root: {root} \
                     (its own: {own_root})"
                );
                outcomes.push(format!("{dir}: started, confined"));
            }
        }
    }
    println!("{}", outcomes.join("\n"));
    k.remove_pod(&pod)?;
    k.finish()
}

#[test]
fn sec_agent_02_an_exec_cwd_in_a_leaked_fd_stays_in_the_rootfs() {
    leaked_fd_exec_cwd().unwrap();
}

fn leaked_fd_exec_cwd() -> Result<()> {
    let s = ctr::setup()?;
    let ctd = ctr::start(
        ContainerdVersion::V2,
        &s,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )?;
    ctr::run_sleeper(&ctd, "cwd1")?;
    let walk_up = |exec_id: &str, cwd: &str| -> Result<Option<String>> {
        let args = [
            "task",
            "exec",
            "--exec-id",
            exec_id,
            "--cwd",
            cwd,
            "cwd1",
            "sh",
            "-c",
            WALK_UP,
        ];
        let out = ctd.ctr(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            println!("exec with cwd {cwd} refused: {stderr}");
            return Ok(None);
        }
        walked_root(&stdout)
            .map(Some)
            .with_context(|| format!("no root line from the exec in {cwd}: {stdout}"))
    };
    let own_root = walk_up("control", "/")?.context("the control exec (cwd /) failed")?;
    ensure!(!own_root.contains(" init "), "{own_root}");
    for fd in 3..=16 {
        let cwd = format!("/proc/self/fd/{fd}");
        if let Some(root) = walk_up(&format!("fd{fd}"), &cwd)? {
            ensure!(
                root == own_root,
                "an exec with cwd {cwd} reached another root: {root} (its own: {own_root})"
            );
            println!("{cwd}: ran, confined");
        }
    }
    ctr::kill_and_remove(&ctd, "cwd1")?;
    ctr::finish(ctd, &s)
}

/// Runs a container `name` with workingDir `dir` and [`WALK_UP`]; its
/// `root:` line, or None when CRI refused to create or start it.
fn walk_up_from(
    k: &Kubelet,
    pod: &clh_tests::cri::Pod,
    name: &str,
    dir: &str,
) -> Result<Option<String>> {
    let c = ContainerBuilder::new(name, BUSYBOX)
        .working_dir(dir)
        .shell(WALK_UP);
    let started = k
        .create_container(pod, &c)
        .and_then(|id| k.cri().start_container(&id));
    if let Err(e) = started {
        println!("{name} (workingDir {dir}) refused: {e:#}");
        return Ok(None);
    }
    let log = pod.log_dir.join(name).join("0.log");
    let text = k
        .cri()
        .wait_for(&format!("{name}'s END in its log"), EXEC_TIMEOUT, |_| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains(" END").then_some(text))
        })?;
    walked_root(&text)
        .map(Some)
        .with_context(|| format!("no root line in {name}'s log: {text}"))
}

/// The listing of [`WALK_UP`]'s `root:` line in `output` (a process's own
/// stdout, or a CRI log whose lines carry a prefix), space-delimited at both
/// ends so that ` init ` matches an entry.
fn walked_root(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.split_once("root: "))
        .map(|(_, listing)| format!(" {} ", listing.trim()))
}
