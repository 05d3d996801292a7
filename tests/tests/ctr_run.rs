//! `ctr run --runtime io.containerd.clh.v2` end to end, on containerd 2.1,
//! 1.7 and 1.6: the container runs in the guest (its `uname -r` is the guest
//! kernel's), exit codes and stdin pass through, bad input is refused
//! clearly, and nothing is left behind; a VM whose VMM or virtiofsd is
//! killed (REL-VMM-01, REL-VFS-01), whose agent hangs or whose kernel
//! panics (REL-AGENT-01, REL-PANIC-01; test guest image) ends its task.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{
    assert_no_leaks, assert_no_leaks_within, run, run_sleeper, setup, start, vm_processes,
    wait_status, Setup, BUSYBOX, RUNTIME,
};
use clh_tests::faults::Fault;

fn tmpdir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn ctr_run_in_a_vm(version: ContainerdVersion) -> Result<()> {
    let s = setup()?;
    let mut ctd = start(version, &s, tmpdir())?;

    let out = run(&ctd, &["t1", "uname", "-r"])?;
    check(&out, "ctr run uname -r")?;
    let release = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        release == s.image.kernel_release,
        "uname -r said {release:?}, the guest kernel is {:?}",
        s.image.kernel_release
    );

    let out = run(&ctd, &["t2", "sh", "-c", "exit 7"])?;
    ensure!(
        out.status.code() == Some(7),
        "exit 7 became {:?}",
        out.status
    );

    // stdin round trip: ctr connects its stdin to the container's.
    let mut child = Command::new(version.bin_dir().join("ctr"))
        .args(["--address"])
        .arg(ctd.address())
        .args([
            "-n",
            ctd.namespace(),
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            BUSYBOX,
            "t3",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"hello through the VM\n")?;
    let out = child.wait_with_output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "hello through the VM\n",
        "cat echoed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );

    ctd.stop()?;
    assert_no_leaks(&ctd, &s.state_dir);
    Ok(())
}

/// A detached container: exec, pids, metrics, kill, delete.
fn exec_kill_and_stats(version: ContainerdVersion) -> Result<()> {
    let s = setup()?;
    let ctd = start(version, &s, tmpdir())?;
    run_sleeper(&ctd, "t4")?;
    let out = ctd.ctr(&["task", "exec", "--exec-id", "e1", "t4", "uname", "-r"])?;
    check(&out, "ctr task exec")?;
    let release = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        release == s.image.kernel_release,
        "exec saw kernel {release:?}"
    );
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "t4",
        "sh",
        "-c",
        "exit 3",
    ])?;
    ensure!(
        out.status.code() == Some(3),
        "exec exit 3 became {:?}",
        out.status
    );
    let out = ctd.ctr(&["task", "ps", "t4"])?;
    check(&out, "ctr task ps")?;
    let out = ctd.ctr(&["task", "metrics", "t4"])?;
    check(&out, "ctr task metrics")?;
    // The guest cgroup's figures, as the host's cgroup version names them.
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == key).then(|| words.next()?.parse::<u64>().ok())?
        })
    };
    let memory = value("memory.usage_in_bytes").or_else(|| value("memory.usage"));
    let cpu = value("cpuacct.usage").or_else(|| value("cpu.usage_usec"));
    ensure!(
        memory.unwrap_or(0) > 0 && cpu.unwrap_or(0) > 0,
        "ctr task metrics shows no memory or CPU use: {text}"
    );
    let out = ctd.ctr(&["task", "kill", "-s", "KILL", "t4"])?;
    check(&out, "ctr task kill")?;
    wait_status(&ctd, "t4", "STOPPED", Duration::from_secs(30))?;
    delete_and_check(ctd, &s, "t4")
}

/// The shim daemon is SIGKILLed under a running container: containerd runs
/// `delete`, which must leave no VM, mount or state behind.
fn shim_crash_cleanup(version: ContainerdVersion) -> Result<()> {
    let s = setup()?;
    let mut ctd = start(version, &s, tmpdir())?;
    run_sleeper(&ctd, "t5")?;
    let shim = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-clh-v2"))
                && args.windows(2).any(|w| w[0] == b"-id" && w[1] == b"t5")
        })
        .context("no shim process for t5")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctd.ctr(&["task", "ls"])?;
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        if !listing
            .lines()
            .any(|l| l.starts_with("t5") && l.contains("RUNNING"))
        {
            break;
        }
        ensure!(Instant::now() < deadline, "t5 still running: {listing}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctd.ctr(&["task", "delete", "--force", "t5"])?;
    check(
        &ctd.ctr(&["container", "delete", "t5"])?,
        "ctr container delete",
    )?;
    ctd.stop()?;
    assert_no_leaks_within(&ctd, &s.state_dir, Duration::from_secs(10));
    Ok(())
}

/// How soon a broken VM's task must be STOPPED: REL-VMM-01's 10 s, plus
/// the fault setup's health check (1 s + 3 s) for a hung agent.
const TASK_ENDS_WITHIN: Duration = Duration::from_secs(15);

/// A standalone container `id` runs, `fault` breaks its VM; containerd
/// must see the task STOPPED within [`TASK_ENDS_WITHIN`], and deleting it
/// must leave nothing.
fn task_ends_after(
    version: ContainerdVersion,
    s: &Setup,
    id: &str,
    fault: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let ctd = start(version, s, tmpdir())?;
    run_sleeper(&ctd, id)?;
    wait_status(&ctd, id, "RUNNING", Duration::from_secs(30))?;
    fault(&s.state_dir.join(id))?;
    wait_status(&ctd, id, "STOPPED", TASK_ENDS_WITHIN)?;
    delete_and_check(ctd, s, id)
}

/// SIGKILLs every `program` process of the VM in `vm_dir`.
fn kill_vm_process(program: &str, vm_dir: &Path) -> Result<()> {
    let victims = vm_processes(program, vm_dir);
    ensure!(!victims.is_empty(), "no {program} of {}", vm_dir.display());
    for pid in victims {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .with_context(|| format!("killing {program} {pid}"))?;
    }
    Ok(())
}

/// REL-VMM-01 through ctr: the VMM is SIGKILLed.
fn vmm_death(version: ContainerdVersion) -> Result<()> {
    task_ends_after(version, &setup()?, "t6", |vm| {
        kill_vm_process("qemu-system-x86_64", vm)
    })
}

/// REL-VFS-01 through ctr: virtiofsd is SIGKILLed.
fn virtiofsd_death(version: ContainerdVersion) -> Result<()> {
    task_ends_after(version, &setup()?, "t8", |vm| {
        kill_vm_process("virtiofsd", vm)
    })
}

/// REL-AGENT-01 and REL-PANIC-01 through ctr: the agent stops answering,
/// or the guest kernel panics (the test guest image's fault switch).
fn guest_fault(version: ContainerdVersion, fault: Fault) -> Result<()> {
    let s = clh_tests::faults::setup()?;
    task_ends_after(version, &s, "t7", |vm| clh_tests::faults::inject(vm, fault))
}

/// Deletes the stopped task and container `id`, stops containerd and
/// fails on anything left.
fn delete_and_check(mut ctd: PrivateContainerd, s: &Setup, id: &str) -> Result<()> {
    check(&ctd.ctr(&["task", "delete", id])?, "ctr task delete")?;
    check(
        &ctd.ctr(&["container", "delete", id])?,
        "ctr container delete",
    )?;
    ctd.stop()?;
    assert_no_leaks(&ctd, &s.state_dir);
    Ok(())
}

fn bad_input_is_refused(version: ContainerdVersion) -> Result<()> {
    let s = setup()?;
    let mut ctd = start(version, &s, tmpdir())?;
    // 70 characters: containerd takes up to 76, the shim up to 64.
    let long = "x".repeat(70);
    let out = run(&ctd, &[&long, "true"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a 70-character id was accepted");
    ensure!(
        stderr.contains("invalid container id"),
        "unclear error: {stderr}"
    );
    ctd.stop()?;
    assert_no_leaks(&ctd, &s.state_dir);
    Ok(())
}

#[test]
fn ctr_run_v2() -> Result<()> {
    ctr_run_in_a_vm(ContainerdVersion::V2)
}

#[test]
fn ctr_run_v1_6() -> Result<()> {
    ctr_run_in_a_vm(ContainerdVersion::V1_6)
}

/// containerd 1.7 (Debian 13's): the legacy start protocol, which refuses
/// a reply announcing task API v3.
#[test]
fn ctr_run_v1_7() -> Result<()> {
    ctr_run_in_a_vm(ContainerdVersion::V1_7)
}

#[test]
fn bad_input_v2() -> Result<()> {
    bad_input_is_refused(ContainerdVersion::V2)
}

#[test]
fn exec_kill_and_stats_v2() -> Result<()> {
    exec_kill_and_stats(ContainerdVersion::V2)
}

#[test]
fn shim_crash_cleanup_v2() -> Result<()> {
    shim_crash_cleanup(ContainerdVersion::V2)
}

#[test]
fn vmm_death_v2() -> Result<()> {
    vmm_death(ContainerdVersion::V2)
}

#[test]
fn virtiofsd_death_v2() -> Result<()> {
    virtiofsd_death(ContainerdVersion::V2)
}

#[test]
fn agent_hang_v2() -> Result<()> {
    guest_fault(ContainerdVersion::V2, Fault::HANG)
}

#[test]
fn guest_panic_v2() -> Result<()> {
    guest_fault(ContainerdVersion::V2, Fault::PANIC)
}
