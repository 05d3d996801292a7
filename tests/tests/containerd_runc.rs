//! Proves the private containerd harness with the runc baseline, on
//! containerd 2.1, 1.7 and 1.6: image import, `ctr run` output and exit codes,
//! the shipped `clh` CRI registration, and a clean stop, also after
//! containerd itself was killed with tasks still running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};

const BUSYBOX: &str = "docker.io/library/busybox:latest";

const PAUSE: &str = "registry.k8s.io/pause:3.10";

/// Builds an image tarball with tests/images/<script>, once per test binary
/// (tests run in parallel threads; the lock makes the others wait).
fn image_tar(script: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let tar = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.tar", script.trim_end_matches(".sh")));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|s| s == script) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("images")
            .join(script);
        let status = Command::new(path).arg(&tar).status()?;
        ensure!(status.success(), "{script} failed: {status}");
        built.push(script.to_owned());
    }
    Ok(tar)
}

fn busybox_tar() -> Result<PathBuf> {
    image_tar("build-busybox-image.sh")
}

/// The CRI plugin is up and the config holds the shipped clh snippet.
fn check_cri_registration(ctd: &PrivateContainerd) -> Result<()> {
    let out = ctd.ctr(&["plugins", "ls"])?;
    check(&out, "ctr plugins ls")?;
    let plugins = String::from_utf8_lossy(&out.stdout);
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
        .with_context(|| format!("no CRI plugin:\n{plugins}"))?;
    ensure!(cri.trim_end().ends_with("ok"), "CRI plugin not ok: {cri}");
    let dump = Command::new(ctd.version().bin_dir().join("containerd"))
        .arg("--config")
        .arg(ctd.config_path())
        .args(["config", "dump"])
        .output()?;
    check(&dump, "containerd config dump")?;
    let dump = String::from_utf8_lossy(&dump.stdout).replace('\'', "\"");
    ensure!(
        dump.contains("runtime_type = \"io.containerd.clh.v2\""),
        "{dump}"
    );
    ensure!(dump.contains("restrict_oom_score_adj = true"), "{dump}");
    Ok(())
}

fn runc_baseline(version: ContainerdVersion) -> Result<()> {
    let mut ctd = PrivateContainerd::start(version, None)?;
    check_cri_registration(&ctd)?;
    ctd.import_image(&busybox_tar()?, BUSYBOX)?;

    let out = ctd.ctr(&["run", "--rm", BUSYBOX, "t1", "echo", "hello"])?;
    check(&out, "ctr run echo")?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "hello",
        "{out:?}"
    );

    let out = ctd.ctr(&["run", "--rm", BUSYBOX, "t2", "sh", "-c", "exit 7"])?;
    ensure!(out.status.code() == Some(7), "{out:?}");

    // The pause image runs, and exits 0 on SIGTERM (ctr's default signal).
    ctd.import_image(&image_tar("build-pause-image.sh")?, PAUSE)?;
    check(&ctd.ctr(&["run", "-d", PAUSE, "p1"])?, "ctr run -d pause")?;
    check(&ctd.ctr(&["tasks", "kill", "p1"])?, "ctr tasks kill")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ctd.ctr(&["tasks", "ls"])?;
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        if listing
            .lines()
            .any(|l| l.starts_with("p1 ") && l.contains("STOPPED"))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "pause ignored SIGTERM: {listing}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    check(&ctd.ctr(&["tasks", "delete", "p1"])?, "ctr tasks delete")?;
    check(&ctd.ctr(&["containers", "rm", "p1"])?, "ctr containers rm")?;

    // A task still running at stop is deleted by stop() through containerd.
    check(
        &ctd.ctr(&["run", "-d", BUSYBOX, "t3", "sleep", "1000"])?,
        "ctr run -d",
    )?;

    ctd.stop()?;
    let leaks = ctd.leak_report();
    ensure!(leaks.is_empty(), "leaked: {leaks:#?}");
    Ok(())
}

/// containerd dies with a task running: stop() must still kill the orphaned
/// shim and the container under it, and unmount its rootfs.
fn cleanup_after_crash(version: ContainerdVersion) -> Result<()> {
    let mut ctd = PrivateContainerd::start(version, None)?;
    ctd.import_image(&busybox_tar()?, BUSYBOX)?;
    check(
        &ctd.ctr(&["run", "-d", BUSYBOX, "c1", "sleep", "1000"])?,
        "ctr run -d",
    )?;
    let out = ctd.ctr(&["tasks", "ls"])?;
    check(&out, "ctr tasks ls")?;
    // TASK PID STATUS
    let listing = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = listing
        .lines()
        .find(|l| l.starts_with("c1 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid for c1 in {listing}"))?;
    ensure!(Path::new(&format!("/proc/{pid}")).exists());

    ctd.kill_daemon()?;
    ensure!(!ctd.leak_report().is_empty(), "a crash should leave a shim");
    ctd.stop()?;
    let leaks = ctd.leak_report();
    ensure!(leaks.is_empty(), "leaked: {leaks:#?}");
    // Gone or a zombie awaiting PID 1 (this host's init reaps lazily).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ensure!(
        state.is_empty() || state.contains(") Z "),
        "container process {pid} survived: {state}"
    );
    Ok(())
}

#[test]
fn runc_baseline_containerd_2() {
    runc_baseline(ContainerdVersion::V2).unwrap();
}

#[test]
fn runc_baseline_containerd_1_6() {
    runc_baseline(ContainerdVersion::V1_6).unwrap();
}

#[test]
fn runc_baseline_containerd_1_7() {
    runc_baseline(ContainerdVersion::V1_7).unwrap();
}

#[test]
fn cleanup_after_crash_containerd_2() {
    cleanup_after_crash(ContainerdVersion::V2).unwrap();
}

#[test]
fn cleanup_after_crash_containerd_1_6() {
    cleanup_after_crash(ContainerdVersion::V1_6).unwrap();
}
