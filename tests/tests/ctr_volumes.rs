//! Volumes through `ctr run --mount` with our runtime: a read-write bind
//! (the container reads the host's file and its write lands on the host),
//! a read-only bind (the write fails, the host file is untouched), a single
//! file, and a host path through `..` into the host's /proc and a source
//! through `..` out of the guest's volume directory, both refused before
//! any VM is left behind. Then the usual leak check.

use std::path::Path;

use anyhow::{ensure, Result};
use clh_tests::containerd::ContainerdVersion;
use clh_tests::ctr::{finish, setup, start, RUNTIME};

const BUSYBOX: &str = "docker.io/library/busybox:latest";

fn tmpdir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

#[test]
fn ctr_mounts() -> Result<()> {
    let s = setup()?;
    let ctd = start(ContainerdVersion::V2, &s, tmpdir())?;
    let host = tempfile::Builder::new().prefix("vol-").tempdir_in("/tmp")?;
    let (rw, ro) = (host.path().join("rw"), host.path().join("ro"));
    std::fs::create_dir(&rw)?;
    std::fs::create_dir(&ro)?;
    std::fs::write(rw.join("in"), "from the host\n")?;
    std::fs::write(ro.join("f"), "original\n")?;
    let single = host.path().join("single.conf");
    std::fs::write(&single, "key=value\n")?;
    let mount = |src: &Path, dst: &str, opts: &str| {
        format!(
            "type=bind,src={},dst={dst},options=rbind:{opts}",
            src.display()
        )
    };
    let (m_rw, m_ro, m_file) = (
        mount(&rw, "/rw", "rw"),
        mount(&ro, "/ro", "ro"),
        mount(&single, "/etc/single.conf", "ro"),
    );
    let script = "cat /rw/in; echo written > /rw/out; cat /etc/single.conf; \
                  if echo x > /ro/f; then echo RO-WRITABLE; else echo ro-refused; fi";
    let out = ctd.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--mount",
        &m_rw,
        "--mount",
        &m_ro,
        "--mount",
        &m_file,
        BUSYBOX,
        "vols",
        "sh",
        "-c",
        script,
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "ctr run with mounts: {out:?}\n{}",
        ctd.log_tail(30)
    );
    ensure!(
        stdout == "from the host\nkey=value\nro-refused\n",
        "container saw {stdout:?}"
    );
    ensure!(std::fs::read_to_string(rw.join("out"))? == "written\n");
    ensure!(std::fs::read_to_string(ro.join("f"))? == "original\n");

    // A host path that resolves into the host's /proc is refused; so is a
    // source in the guest's volume directory, which would name a guest path
    // (SEC-FS-08: `..` does not get it past the check).
    let escapes = [
        (format!("{}/../../proc", host.path().display()), "/proc"),
        ("/run/clh/volumes/../../etc".to_string(), "reserved"),
    ];
    for (src, needle) in escapes {
        let escape = format!("type=bind,src={src},dst=/p,options=rbind:ro");
        let out = ctd.ctr(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--mount",
            &escape,
            BUSYBOX,
            "esc",
            "true",
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success() && stderr.contains(needle),
            "a bind of {src} was not refused: {out:?}"
        );
        // ctr leaves the container record after a failed start.
        let _ = ctd.ctr(&["container", "rm", "esc"]);
    }
    finish(ctd, &s)
}

/// Read-only as runc has it (`rro` through ctr: containerd 2.1's CRI never
/// sends it to a non-runc handler): `ro` leaves a read-write tmpfs below
/// the volume writable, `rro` does not; both keep the volume itself
/// read-only.
#[test]
fn ctr_read_only_and_recursively_read_only() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        clh_test_skip::skip("mounting the host's tmpfs needs root");
        return Ok(());
    }
    let s = setup()?;
    let ctd = start(ContainerdVersion::V2, &s, tmpdir())?;
    let host = tempfile::Builder::new().prefix("vol-").tempdir_in("/tmp")?;
    let sub = host.path().join("sub");
    std::fs::create_dir(&sub)?;
    let none = None::<&str>;
    let flags = nix::mount::MsFlags::empty();
    nix::mount::mount(Some("tmpfs"), &sub, Some("tmpfs"), flags, none)?;
    let run = || -> Result<String> {
        let mount = |dst: &str, opts: &str| {
            format!(
                "type=bind,src={},dst={dst},options=rbind:{opts}",
                host.path().display()
            )
        };
        let (ro, rro) = (mount("/ro", "ro"), mount("/rro", "rro"));
        let script = "for p in /ro/x /ro/sub/x /rro/y /rro/sub/y; do \
                      if echo w > $p; then echo $p writable; else echo $p refused; fi; done";
        let out = ctd.ctr(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--mount",
            &ro,
            "--mount",
            &rro,
            BUSYBOX,
            "rro",
            "sh",
            "-c",
            script,
        ])?;
        ensure!(
            out.status.success(),
            "ctr run: {out:?}\n{}",
            ctd.log_tail(30)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let seen = run();
    let written = std::fs::read_to_string(sub.join("x")).ok();
    nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH)?;
    let seen = seen?;
    ensure!(
        seen == "/ro/x refused\n/ro/sub/x writable\n/rro/y refused\n/rro/sub/y refused\n",
        "container saw {seen:?}"
    );
    ensure!(
        written.as_deref() == Some("w\n"),
        "the submount write: {written:?}"
    );
    finish(ctd, &s)
}
