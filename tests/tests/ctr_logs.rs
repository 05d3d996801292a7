//! Logs, end to end (issue 12, item 5):
//!
//! - the shim's log reaches containerd's log (the `log` FIFO in the
//!   bundle), in containerd's own `time="..." level=... msg=...` format,
//!   with the runtime, namespace and id: the "VM started" and "VM stopped"
//!   lines of a `ctr run` container on containerd 2.1 and 1.6, and of a
//!   CRI pod;
//! - `containerd-shim-clh-v2 logs ID` prints the VM's guest console, where
//!   the agent says it serves ttrpc: by the container's id, by a pod's
//!   sandbox id, and by the id of one of the pod's containers (its
//!   sandbox's VM); `--agent` prints only the agent's lines; `--follow`
//!   ends when the VM stops; an unknown id is a clear error.
//!
//! Run one at a time (`-- --test-threads=1`): each boots VMs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd, CRI_NAMESPACE};
use clh_tests::cri::{ContainerBuilder, Kubelet, BUSYBOX as CRI_BUSYBOX};
use clh_tests::ctr::{self, run_sleeper, setup, start, wait_within, RUNTIME};
use containerd_shim_clh_v2::logs::is_agent_line;

/// What the agent prints once it serves (guest-agent/src/main.rs).
const SERVING: &str = "serving ttrpc";

/// How long a line the shim logged may take to reach containerd's log
/// (through the shim's writer thread and containerd's copy).
const LOG_DEADLINE: Duration = Duration::from_secs(30);

fn tmpdir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn shim() -> Result<PathBuf> {
    Ok(ctr::shim_dir()?.join("containerd-shim-clh-v2"))
}

/// `containerd-shim-clh-v2 logs --config CONFIG args...`.
fn logs(config: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(shim()?);
    cmd.arg("logs").arg("--config").arg(config).args(args);
    clh_tests::containerd::run_with_timeout(cmd, Duration::from_secs(60))
}

/// Whether `line` is logrus' text format as containerd writes it:
/// `time="<RFC 3339 with nanoseconds>" level=<level> msg=...`.
fn is_containerd_format(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("time=\"") else {
        return false;
    };
    let Some((stamp, rest)) = rest.split_once('"') else {
        return false;
    };
    // 2026-12-06T04:25:25.123456789Z
    let shape = "dddd-dd-ddTdd:dd:dd.dddddddddZ";
    let stamp_ok = stamp.len() == shape.len()
        && stamp.chars().zip(shape.chars()).all(|(c, s)| match s {
            'd' => c.is_ascii_digit(),
            s => c == s,
        });
    let Some(rest) = rest.strip_prefix(" level=") else {
        return false;
    };
    let Some((level, rest)) = rest.split_once(' ') else {
        return false;
    };
    stamp_ok
        && ["trace", "debug", "info", "warning", "error"].contains(&level)
        && rest.starts_with("msg=")
}

/// Waits for the shim's line `msg` about `id` in containerd's log and
/// checks its format and fields; returns it.
fn wait_shim_line(ctd: &PrivateContainerd, namespace: &str, msg: &str, id: &str) -> Result<String> {
    let quoted = format!("msg=\"{msg}\"");
    let fields = [
        format!(" id={id}"),
        format!(" namespace={namespace}"),
        format!(" runtime={RUNTIME}"),
    ];
    let deadline = Instant::now() + LOG_DEADLINE;
    loop {
        let log = std::fs::read_to_string(ctd.log_path())
            .with_context(|| format!("reading {}", ctd.log_path().display()))?;
        let found = log
            .lines()
            .find(|l| l.contains(&quoted) && fields.iter().all(|f| l.contains(f.as_str())));
        if let Some(line) = found {
            ensure!(
                is_containerd_format(line) && line.contains(" level=info "),
                "the shim's line is not in containerd's format: {line}"
            );
            return Ok(line.to_string());
        }
        ensure!(
            Instant::now() < deadline,
            "no shim line {quoted} with{fields:?} in containerd's log within {LOG_DEADLINE:?}:\n{}",
            ctd.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `logs ID` prints the console with the agent's serving line; `--agent`
/// only agent lines, that one among them.
fn check_console(config: &Path, id: &str) -> Result<String> {
    // The agent prints the line once it listens, which races with the
    // shim's first call; the console reaches its log through the serial
    // port and the shim's copier.
    let deadline = Instant::now() + LOG_DEADLINE;
    loop {
        let out = logs(config, &[id])?;
        check(&out, &format!("logs {id}"))?;
        let console = String::from_utf8_lossy(&out.stdout).to_string();
        if console.contains(SERVING) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "logs {id} has no {SERVING:?} within {LOG_DEADLINE:?}:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = logs(config, &["--agent", id])?;
    check(&out, &format!("logs --agent {id}"))?;
    let agent = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        agent.lines().any(|l| l.contains(SERVING)),
        "logs --agent {id} has no {SERVING:?}:\n{agent}"
    );
    ensure!(
        agent.lines().all(is_agent_line),
        "logs --agent {id} printed more than the agent's lines:\n{agent}"
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

fn unknown_id_is_a_clear_error(config: &Path) -> Result<()> {
    let out = logs(config, &["no-such-pod"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "logs of an unknown pod: {:?}, {stderr}",
        out.status
    );
    ensure!(
        stderr.contains("no pod or container no-such-pod runs with io.containerd.clh.v2"),
        "unclear error for an unknown pod: {stderr}"
    );
    Ok(())
}

fn ctr_container_logs(version: ContainerdVersion) -> Result<()> {
    let s = setup()?;
    let mut ctd = start(version, &s, tmpdir())?;
    let id = "logs1";
    run_sleeper(&ctd, id)?;
    let started = wait_shim_line(&ctd, ctd.namespace(), "VM started", id)?;
    eprintln!("containerd {version:?} logged: {started}");
    ensure!(
        started.contains(" backend=Qemu") && started.contains(" vcpus="),
        "the VM started line lacks its details: {started}"
    );

    check_console(&s.config, id)?;
    unknown_id_is_a_clear_error(&s.config)?;

    // --follow prints the console until the VM stops.
    let mut follower = Command::new(shim()?)
        .arg("logs")
        .arg("--config")
        .arg(&s.config)
        .args(["--follow", id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning logs --follow")?;
    let mut stdout = follower.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });

    ctr::kill_and_remove(&ctd, id)?;
    wait_shim_line(&ctd, ctd.namespace(), "VM stopped", id)?;

    let status = wait_within(&mut follower, Duration::from_secs(30))
        .context("logs --follow did not end with the VM")?;
    let followed = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader of logs --follow panicked"))?;
    let mut stderr = String::new();
    if let Some(mut e) = follower.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    ensure!(status.success(), "logs --follow: {status}: {stderr}");
    ensure!(
        followed.contains(SERVING),
        "logs --follow printed no {SERVING:?}:\n{followed}"
    );
    ensure!(
        stderr.contains(&format!("the VM of {id} stopped")),
        "logs --follow did not say the VM stopped: {stderr}"
    );

    ctd.stop()?;
    ctr::assert_no_leaks(&ctd, &s.state_dir);
    Ok(())
}

#[test]
fn ctr_logs_v2() -> Result<()> {
    ctr_container_logs(ContainerdVersion::V2)
}

#[test]
fn ctr_logs_v1_6() -> Result<()> {
    ctr_container_logs(ContainerdVersion::V1_6)
}

/// A pod through CRI: the sandbox's VM started line in containerd's log,
/// and its console by the sandbox's id and by its container's.
#[test]
fn cri_pod_logs() -> Result<()> {
    let s = setup()?;
    let (s, cri) = ctr::cri_test_setup(s, tmpdir(), 120_000);
    let k = Kubelet::start(&cri)?;
    let pod = k.run_pod(&k.pod("logs"))?;
    let container = k.run_container(
        &pod,
        &ContainerBuilder::new("sleeper", CRI_BUSYBOX).command(&["sleep", "100000"]),
    )?;
    k.cri().wait_container_state(
        &container,
        clh_tests::cri::ContainerState::ContainerRunning,
        k.timeout(),
    )?;
    wait_shim_line(k.containerd(), CRI_NAMESPACE, "VM started", &pod.id)?;

    check_console(&s.config, &pod.id)?;
    let said = check_console(&s.config, &container)?;
    ensure!(
        said.contains(&format!("runs in the VM of pod sandbox {}", pod.id)),
        "logs of the pod's container did not name its sandbox: {said}"
    );

    k.remove_pod(&pod)?;
    wait_shim_line(k.containerd(), CRI_NAMESPACE, "VM stopped", &pod.id)?;
    k.finish()
}
