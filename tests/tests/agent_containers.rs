//! The agent runs OCI containers: a real guest (QEMU TCG through `PodVm`),
//! a busybox rootfs in the VM's shared directory, and the agent's container
//! RPCs and stdio streams driven through `clh-agent-client`.
//!
//! Needs the guest image (`make guest-image`) and busybox-static
//! (`packaging/install-containerd.sh`); a missing one fails the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_agent_client::{open_stdio_stream, AgentClient, Stdio, StdioKind};
use clh_agent_protocol::GUEST_SHARED_DIR;
use clh_tests::{containerd::cache_dir, qemu_options, state_root, GuestImage, LeakCheck};
use containerd_shim_clh_v2::shared_mount::private_dir;
use containerd_shim_clh_v2::vm::PodVm;
use oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// TCG is slow; no single step of these tests should take longer.
const STEP: Duration = Duration::from_secs(60);

fn busybox() -> Result<PathBuf> {
    let path = cache_dir().join("busybox-static/bin/busybox");
    ensure!(
        path.is_file(),
        "{} is missing: run packaging/install-containerd.sh first",
        path.display()
    );
    Ok(path)
}

/// `<shared>/<cid>/rootfs`: busybox and the applets the tests run.
fn make_rootfs(shared: &Path, cid: &str) -> Result<()> {
    let rootfs = shared.join(cid).join("rootfs");
    for dir in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::copy(busybox()?, rootfs.join("bin/busybox")).context("copying busybox")?;
    for applet in ["sh", "cat", "echo", "sleep", "stty", "mkdir", "grep", "dd"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    Ok(())
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// oci-spec's default (runc's: namespaces, capabilities, masked paths,
/// rlimits, the usual mounts) with our rootfs and command.
fn spec_json(cid: &str, argv: &[&str]) -> Result<Vec<u8>> {
    let mut spec = Spec::default();
    let root = format!("{GUEST_SHARED_DIR}/{cid}/rootfs");
    spec.set_root(Some(
        RootBuilder::default().path(root).readonly(false).build()?,
    ));
    let mut process = spec
        .process()
        .clone()
        .context("default spec has a process")?;
    process.set_args(Some(args(argv)));
    process.set_terminal(Some(false));
    process.set_env(Some(args(&["PATH=/bin"])));
    spec.set_process(Some(process));
    spec.set_hostname(Some(cid.to_owned()));
    Ok(serde_json::to_vec(&spec)?)
}

fn process_json(argv: &[&str]) -> Result<Vec<u8>> {
    let p = ProcessBuilder::default()
        .args(args(argv))
        .env(args(&["PATH=/bin"]))
        .cwd("/")
        .build()?;
    Ok(serde_json::to_vec(&p)?)
}

fn stdio(stdin: bool, stdout: bool, stderr: bool) -> Stdio {
    Stdio {
        stdin,
        stdout,
        stderr,
        ..Default::default()
    }
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(STEP, f)
        .await
        .with_context(|| format!("{what}: no result within {STEP:?}"))
}

async fn read_all(what: &str, mut s: tokio::net::UnixStream) -> Result<String> {
    let mut out = String::new();
    step(what, s.read_to_string(&mut out)).await??;
    Ok(out)
}

async fn wait(agent: &AgentClient, cid: &str, exec: &str) -> Result<u32> {
    let what = format!("waiting for {cid}/{exec}");
    Ok(step(&what, agent.wait_process(cid, exec))
        .await??
        .exit_status)
}

/// The hybrid-vsock socket, `<dir>/vsock.sock` with either backend
/// (docs/ARCHITECTURE.md).
fn vsock_socket(vm: &PodVm) -> PathBuf {
    vm.dir().join("vsock.sock")
}

/// Init prints and exits with a code; stdin round trip through `cat`.
async fn run_and_cat(vm: &PodVm) -> Result<()> {
    let (agent, uds) = (vm.agent(), vsock_socket(vm));
    let shared = private_dir(vm.dir());

    make_rootfs(&shared, "c1")?;
    // pivot_root detached the guest's root (the initramfs "rootfs"): it is
    // not in the container's mount table.
    let script = "echo hello; grep -q ' - rootfs ' /proc/self/mountinfo && echo guest-root; exit 7";
    let spec = spec_json("c1", &["sh", "-c", script])?;
    agent
        .create_container("c1", &spec, stdio(false, true, true))
        .await?;
    let out = open_stdio_stream(&uds, "c1", "", StdioKind::Stdout).await?;
    let err = open_stdio_stream(&uds, "c1", "", StdioKind::Stderr).await?;
    let pid = agent.start_process("c1", "").await?;
    ensure!(pid > 0, "init pid {pid}");
    assert_eq!(read_all("c1 stdout", out).await?, "hello\n");
    assert_eq!(read_all("c1 stderr", err).await?, "");
    assert_eq!(wait(agent, "c1", "").await?, 7);
    let dup = agent.create_container("c1", &spec, stdio(false, false, false));
    let dup = dup.await.expect_err("a second create of c1 must fail");
    assert_eq!(dup.rpc_code(), Some(ttrpc::Code::ALREADY_EXISTS), "{dup:?}");
    agent.remove_container("c1").await?;
    let gone = agent.start_process("c1", "").await;
    let gone = gone.expect_err("c1 was removed");
    assert_eq!(gone.rpc_code(), Some(ttrpc::Code::NOT_FOUND), "{gone:?}");

    make_rootfs(&shared, "c2")?;
    let spec = spec_json("c2", &["cat"])?;
    agent
        .create_container("c2", &spec, stdio(true, true, false))
        .await?;
    let mut input = open_stdio_stream(&uds, "c2", "", StdioKind::Stdin).await?;
    let out = open_stdio_stream(&uds, "c2", "", StdioKind::Stdout).await?;
    agent.start_process("c2", "").await?;
    input.write_all(b"ping\n").await?;
    // The half-close is the container's EOF.
    input.shutdown().await?;
    assert_eq!(read_all("c2 stdout", out).await?, "ping\n");
    assert_eq!(wait(agent, "c2", "").await?, 0);
    agent.remove_container("c2").await?;
    Ok(())
}

/// Execs, a signal, stats, pids, kill-all.
async fn exec_signal_stats(vm: &PodVm) -> Result<()> {
    let (agent, uds) = (vm.agent(), vsock_socket(vm));
    make_rootfs(&private_dir(vm.dir()), "c3")?;
    let spec = spec_json("c3", &["sleep", "1000"])?;
    agent
        .create_container("c3", &spec, stdio(false, false, false))
        .await?;
    agent.start_process("c3", "").await?;

    let echo = process_json(&["echo", "from-exec"])?;
    agent
        .exec_process("c3", "e1", &echo, stdio(false, true, false))
        .await?;
    let out = open_stdio_stream(&uds, "c3", "e1", StdioKind::Stdout).await?;
    agent.start_process("c3", "e1").await?;
    assert_eq!(read_all("e1 stdout", out).await?, "from-exec\n");
    assert_eq!(wait(agent, "c3", "e1").await?, 0);

    // Not PID 1 of the container, so SIGTERM's default action applies.
    let sleep = process_json(&["sleep", "1000"])?;
    agent
        .exec_process("c3", "e2", &sleep, stdio(false, false, false))
        .await?;
    agent.start_process("c3", "e2").await?;
    agent.signal_process("c3", "e2", 15, false).await?;
    assert_eq!(wait(agent, "c3", "e2").await?, 143);

    let stats = agent.container_stats("c3").await?;
    ensure!(stats.memory_usage_bytes > 0, "{stats:?}");
    ensure!(stats.cpu_usage_usec > 0, "{stats:?}");
    ensure!(stats.pids_current >= 1, "{stats:?}");
    let pids = agent.list_pids("c3").await?;
    ensure!(!pids.is_empty(), "no pids in c3");

    agent.signal_process("c3", "", 9, true).await?;
    assert_eq!(wait(agent, "c3", "").await?, 137);
    agent.remove_container("c3").await?;
    Ok(())
}

/// Pause/resume, a memory limit set by UpdateContainer, an OOM kill that
/// GetOomEvent reports.
async fn limits_and_oom(vm: &PodVm) -> Result<()> {
    let agent = vm.agent();
    make_rootfs(&private_dir(vm.dir()), "c6")?;
    let spec = spec_json("c6", &["sleep", "1000"])?;
    agent
        .create_container("c6", &spec, stdio(false, false, false))
        .await?;
    agent.start_process("c6", "").await?;
    agent.pause_container("c6").await?;
    agent.resume_container("c6").await?;
    let limit = 16 << 20;
    let resources = format!(r#"{{"memory":{{"limit":{limit}}},"pids":{{"limit":50}}}}"#);
    agent.update_container("c6", resources.as_bytes()).await?;
    let stats = agent.container_stats("c6").await?;
    assert_eq!((stats.memory_limit_bytes, stats.pids_limit), (limit, 50));
    let bad = agent.update_container("c6", b"{not json").await;
    let bad = bad.expect_err("bad JSON");
    assert_eq!(
        bad.rpc_code(),
        Some(ttrpc::Code::INVALID_ARGUMENT),
        "{bad:?}"
    );

    // dd touches its whole 64 MiB buffer: killed at the 16 MiB limit.
    let hog = process_json(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])?;
    agent
        .exec_process("c6", "hog", &hog, stdio(false, false, false))
        .await?;
    agent.start_process("c6", "hog").await?;
    assert_eq!(wait(agent, "c6", "hog").await?, 137);
    assert_eq!(step("OOM event", agent.get_oom_event()).await??, "c6");
    agent.remove_container("c6").await?;
    Ok(())
}

/// The spec's seccomp filter is applied: mkdir fails with EPERM.
async fn seccomp(vm: &PodVm) -> Result<()> {
    let (agent, uds) = (vm.agent(), vsock_socket(vm));
    make_rootfs(&private_dir(vm.dir()), "c5")?;
    let argv = [
        "sh",
        "-c",
        "mkdir /tmp/d 2>/dev/null && echo made || echo denied",
    ];
    let mut spec: serde_json::Value = serde_json::from_slice(&spec_json("c5", &argv)?)?;
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let spec = serde_json::to_vec(&spec)?;
    agent
        .create_container("c5", &spec, stdio(false, true, false))
        .await?;
    let out = open_stdio_stream(&uds, "c5", "", StdioKind::Stdout).await?;
    agent.start_process("c5", "").await?;
    assert_eq!(read_all("c5 stdout", out).await?, "denied\n");
    assert_eq!(wait(agent, "c5", "").await?, 0);
    agent.remove_container("c5").await?;
    Ok(())
}

/// A terminal: attach before Start, resize, input echoes, EOF at exit.
async fn terminal(vm: &PodVm) -> Result<()> {
    let (agent, uds) = (vm.agent(), vsock_socket(vm));
    make_rootfs(&private_dir(vm.dir()), "c4")?;
    let spec = spec_json("c4", &["sh", "-c", "read x; stty size; echo got-$x"])?;
    let tty = Stdio {
        terminal: true,
        ..stdio(true, true, false)
    };
    agent.create_container("c4", &spec, tty).await?;
    let mut input = open_stdio_stream(&uds, "c4", "", StdioKind::Stdin).await?;
    let out = open_stdio_stream(&uds, "c4", "", StdioKind::Stdout).await?;
    let err = open_stdio_stream(&uds, "c4", "", StdioKind::Stderr).await;
    ensure!(err.is_err(), "a terminal has no stderr stream");
    agent.start_process("c4", "").await?;
    agent.resize_tty("c4", "", 100, 40).await?;
    input.write_all(b"hi\n").await?;
    let text = read_all("c4 tty", out).await?;
    ensure!(
        text.contains("40 100") && text.contains("got-hi"),
        "{text:?}"
    );
    assert_eq!(wait(agent, "c4", "").await?, 0);
    let no_tty = agent.resize_tty("c4", "nope", 1, 1).await;
    let no_tty = no_tty.expect_err("no such exec");
    assert_eq!(
        no_tty.rpc_code(),
        Some(ttrpc::Code::NOT_FOUND),
        "{no_tty:?}"
    );
    agent.remove_container("c4").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_in_the_guest() {
    let image = GuestImage::locate().unwrap();
    busybox().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    let mut opts = qemu_options(&image);
    opts.debug = true;
    let vm = PodVm::start("ctrs", root.path(), &opts).await.unwrap();

    let result = async {
        run_and_cat(&vm).await.context("run and cat")?;
        exec_signal_stats(&vm)
            .await
            .context("exec, signal, stats")?;
        terminal(&vm).await.context("terminal")?;
        seccomp(&vm).await.context("seccomp")?;
        limits_and_oom(&vm).await.context("limits and OOM")
    }
    .await;
    clh_tests::stop_vm_and_report(vm, result).await;
    leaks.assert_clean().await;
}
