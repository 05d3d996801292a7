//! Acceptance tests for `ctr run --runtime io.containerd.clh.v2` on a
//! private containerd 2.x: two VMs at once, a read-only rootfs, an OOM kill with its TaskOOM event, kill exit codes,
//! and bad input refused clearly. Every test ends with the leak checks.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{
    ctr_command, finish, leaks, run_sleeper, setup, wait_status, wait_within, Setup, BUSYBOX,
    RUNTIME, VM_DEADLINE,
};

fn start(s: &Setup) -> Result<PrivateContainerd> {
    clh_tests::ctr::start(
        ContainerdVersion::V2,
        s,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
}

/// Two containers started at once run in two VMs: two guest boot ids,
/// neither the host's.
#[test]
fn two_containers_get_two_vms() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    let ids = ["par1", "par2"];
    let outs: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let ctd = &ctd;
                scope.spawn(move || run_sleeper(ctd, id))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in outs {
        out?;
    }
    let mut boot_ids = Vec::new();
    for id in ids {
        boot_ids.push(clh_tests::ctr::boot_id(&ctd, id)?);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    boot_ids.push(host.trim().to_string());
    // Three distinct ids: two VMs, neither running on the host's kernel.
    let distinct: std::collections::BTreeSet<_> = boot_ids.iter().collect();
    ensure!(
        distinct.len() == 3,
        "boot ids (par1, par2, host): {boot_ids:?}"
    );
    for id in ids {
        check(
            &ctd.ctr(&["task", "kill", "-s", "KILL", id])?,
            "ctr task kill",
        )?;
    }
    for id in ids {
        wait_status(&ctd, id, "STOPPED", VM_DEADLINE)?;
        check(&ctd.ctr(&["task", "delete", id])?, "ctr task delete")?;
        check(
            &ctd.ctr(&["container", "delete", id])?,
            "ctr container delete",
        )?;
    }
    finish(ctd, &s)
}

#[test]
fn readonly_rootfs_refuses_writes() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--read-only",
        BUSYBOX,
        "ro1",
        "sh",
        "-c",
        "touch /x",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "touch /x succeeded on a read-only rootfs"
    );
    ensure!(
        stderr.contains("Read-only file system"),
        "unclear error: {stderr}"
    );
    finish(ctd, &s)
}

/// A hog past its 32 MiB limit is OOM-killed in the guest: `ctr run` exits
/// 137 and containerd publishes TaskOOM for it.
#[test]
fn memory_limit_oom_kills_with_an_event() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    let mut events = ctr_command(&ctd, &["events"])
        .stdout(Stdio::piped())
        .spawn()?;
    let rx = stdout_lines(&mut events)?;
    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--memory-limit",
        "33554432",
        BUSYBOX,
        "oom1",
        "sh",
        "-c",
        "x=a; while :; do x=$x$x; done",
    ]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let oom = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("/tasks/oom") && line.contains("oom1") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = events.kill();
    let _ = events.wait();
    let out = out?;
    ensure!(
        out.status.code() == Some(137),
        "the hog ended {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(oom, "no TaskOOM for oom1; events seen: {seen:#?}");
    finish(ctd, &s)
}

/// SIGKILL ends the container's `sleep` with 137 (ctr_run.rs kills with
/// SIGKILL but never checks the status); SIGTERM ends an exec'd `sleep`
/// with 143. Not the init's: as PID 1 of its namespace `sleep` ignores
/// SIGTERM, in the guest as under runc.
#[test]
fn kill_exit_codes() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    let mut init = ctr_command(
        &ctd,
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            BUSYBOX,
            "kill1",
            "sleep",
            "1000",
        ],
    )
    .stdin(Stdio::null())
    .spawn()?;
    wait_status(&ctd, "kill1", "RUNNING", VM_DEADLINE)?;
    let exec_args = [
        "task",
        "exec",
        "--exec-id",
        "e1",
        "kill1",
        "sh",
        "-c",
        "echo started; exec sleep 1000",
    ];
    let mut exec = ctr_command(&ctd, &exec_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    // Started once it says so: `ctr task ps` lists an exec the guest has
    // created but not yet started, and a signal to it then is refused.
    let said = stdout_lines(&mut exec)?.recv_timeout(VM_DEADLINE);
    ensure!(said.as_deref() == Ok("started"), "exec e1: {said:?}");
    let args = ["task", "kill", "--exec-id", "e1", "-s", "SIGTERM", "kill1"];
    check(&ctd.ctr(&args)?, "ctr task kill -s SIGTERM")?;
    let term = wait_within(&mut exec, VM_DEADLINE)?.code();
    let args = ["task", "kill", "-s", "SIGKILL", "kill1"];
    check(&ctd.ctr(&args)?, "ctr task kill -s SIGKILL")?;
    let kill = wait_within(&mut init, VM_DEADLINE)?.code();
    ensure!(term == Some(143), "SIGTERM: exit {term:?}");
    ensure!(kill == Some(137), "SIGKILL: exit {kill:?}");
    finish(ctd, &s)
}

/// No container, shim, VM, mount or state left (containerd's own dirs stay
/// until it stops); a failed shim may take a moment to exit.
fn nothing_running(ctd: &PrivateContainerd, s: &Setup) -> Result<()> {
    let out = ctd.ctr(&["container", "ls", "-q"])?;
    let containers = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(containers.is_empty(), "containers left: {containers}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaks: Vec<String> = leaks(ctd, &s.state_dir)
            .into_iter()
            .filter(|l| !l.starts_with("dir ") && !l.starts_with("containerd pid"))
            .collect();
        if leaks.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "left behind: {leaks:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn refused(out: &Output, what: &str, needle: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{what} was accepted");
    ensure!(stderr.contains(needle), "{what}: unclear error: {stderr}");
    Ok(())
}

#[test]
fn bad_input_is_refused_clearly() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;

    // ctr parses --config itself, so broken JSON never reaches the shim;
    // the shim's own parse error is covered by its unit tests.
    let bad = ctd.dir().join("bad-config.json");
    std::fs::write(&bad, "{ \"ociVersion\": ")?;
    let bad = bad.display().to_string();
    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--config",
        &bad,
        "cfg1",
    ])?;
    refused(&out, "a malformed config.json", "unexpected end of JSON")?;
    nothing_running(&ctd, &s)?;

    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--rootfs",
        "/nonexistent/rootfs",
        "rfs1",
        "true",
    ])?;
    refused(&out, "a missing rootfs", "/nonexistent/rootfs")?;
    nothing_running(&ctd, &s)?;

    // ctr sends runtimeoptions.v1.Options for --runtime-config-path.
    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--runtime-config-path",
        "/etc/hosts",
        BUSYBOX,
        "opt1",
        "true",
    ])?;
    refused(&out, "runtime options", "unsupported runtime options")?;
    nothing_running(&ctd, &s)?;
    finish(ctd, &s)
}

/// The lines `child` writes to its piped stdout, as they come.
fn stdout_lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("the child's stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Ok(rx)
}
