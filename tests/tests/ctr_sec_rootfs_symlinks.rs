//! A container image whose symlinks try to steer the guest's mounts out of
//! the container, run with `ctr run --rootfs` on the `clh` runtime (a real
//! guest, a real containerd):
//!
//! - `sec_agent_03_a_rootfs_whose_proc_is_a_symlink_is_refused`
//!   (CVE-2019-19921, CVE-2019-16884): `/proc` in the image is a symlink
//!   (to `/`, out of the rootfs by `..`, to `/dev`): the container does not
//!   start, and the error names `/proc` and its target.
//! - `sec_agent_04_mount_destinations_through_symlinks_stay_in_the_rootfs`
//!   (CVE-2021-30465): a volume whose destination goes through a symlink
//!   of the image (`/var/run -> /run`, `/var/run -> ../../../..`) lands
//!   inside the rootfs, where the container finds the volume's canary, or
//!   the container does not start.
//!
//! Each ends with the leak checks. Run one at a time
//! (`-- --test-threads=1`): each boots VMs.

use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{ensure, Result};
use clh_tests::containerd::{ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{self, Setup, RUNTIME};

fn start(s: &Setup) -> Result<PrivateContainerd> {
    ctr::start(
        ContainerdVersion::V2,
        s,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
}

/// A busybox rootfs in `dir` with `/proc` and `/var/run` left for the
/// caller to make.
fn busybox_rootfs(dir: &Path) -> Result<()> {
    let dirs = ["dev", "sys", "tmp", "etc", "run", "var"];
    ctr::busybox_rootfs(dir, &dirs, &["sh", "cat", "ls", "echo"])
}

/// What `ctr run` did: whether it succeeded, and what it printed.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `ctr run --rm [extra...] --rootfs rootfs id /bin/sh -c script` (the
/// rootfs stands where the image would, after every flag); prints what it
/// did under `label`.
fn run_in(
    ctd: &PrivateContainerd,
    label: &str,
    rootfs: &Path,
    extra: &[&str],
    id: &str,
    script: &str,
) -> Result<Ran> {
    let rootfs = rootfs.to_string_lossy();
    // Without an image config, nothing sets PATH, which youki requires.
    let mut args = vec!["run", "--runtime", RUNTIME, "--rm", "--env", "PATH=/bin"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--rootfs", &rootfs, id, "/bin/sh", "-c", script]);
    let out = ctd.ctr(&args)?;
    let ran = Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!("{label}: {:?}\n{}{}", out.status, ran.stdout, ran.stderr);
    Ok(ran)
}

#[test]
fn sec_agent_03_a_rootfs_whose_proc_is_a_symlink_is_refused() {
    proc_symlinks().unwrap();
}

fn proc_symlinks() -> Result<()> {
    let s = ctr::setup()?;
    let ctd = start(&s)?;
    let images = tempfile::tempdir()?;
    for (n, target) in ["/", "../../../../../../../..", "/dev"]
        .into_iter()
        .enumerate()
    {
        let rootfs = images.path().join(format!("proc{n}"));
        busybox_rootfs(&rootfs)?;
        symlink(target, rootfs.join("proc"))?;
        let label = format!("/proc -> {target}");
        let ran = run_in(
            &ctd,
            &label,
            &rootfs,
            &[],
            &format!("proc{n}"),
            "echo STARTED",
        )?;
        ensure!(
            !ran.ok && !ran.stdout.contains("STARTED"),
            "a container whose /proc is a symlink to {target} started"
        );
        let why = format!("/proc is a symlink to {target}");
        ensure!(
            ran.stderr.contains(&why),
            "the error does not say {why:?}: {}",
            ran.stderr
        );
    }
    ctr::finish(ctd, &s)
}

#[test]
fn sec_agent_04_mount_destinations_through_symlinks_stay_in_the_rootfs() {
    mount_destination_symlinks().unwrap();
}

fn mount_destination_symlinks() -> Result<()> {
    let s = ctr::setup()?;
    let ctd = start(&s)?;
    let dirs = tempfile::tempdir()?;
    let volume = dirs.path().join("volume");
    std::fs::create_dir(&volume)?;
    std::fs::write(volume.join("canary"), "volume-canary\n")?;
    let mount = format!(
        "type=bind,src={},dst=/var/run/x,options=rbind:ro",
        volume.display()
    );
    // Where the volume must appear in the container for each link.
    for (n, (target, inside)) in [("/run", "/run/x"), ("../../../../../../../..", "/x")]
        .into_iter()
        .enumerate()
    {
        let rootfs = dirs.path().join(format!("var{n}"));
        busybox_rootfs(&rootfs)?;
        std::fs::create_dir(rootfs.join("proc"))?;
        symlink(target, rootfs.join("var/run"))?;
        let label = format!("/var/run -> {target}");
        let mount = ["--mount", &mount];
        let script = format!("cat {inside}/canary");
        let ran = run_in(&ctd, &label, &rootfs, &mount, &format!("var{n}"), &script)?;
        if ran.ok {
            ensure!(
                ran.stdout.contains("volume-canary"),
                "{label}: the volume is not at {inside} in the container"
            );
        } else {
            ensure!(
                ran.stderr.contains("/var/run"),
                "{label}: refused for another reason: {}",
                ran.stderr
            );
        }
    }
    ctr::finish(ctd, &s)
}
