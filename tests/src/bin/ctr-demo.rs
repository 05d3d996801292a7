//! `make demo`: a private containerd 2.x (state under the given directory,
//! never the system's), the busybox image, and
//! `ctr run --runtime io.containerd.clh.v2 --rm ... uname -r`, which prints
//! the guest kernel's release; then a check that nothing is left behind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};

const BUSYBOX: &str = "docker.io/library/busybox:latest";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, shim_dir, image_tar, work_dir] = args.as_slice() else {
        bail!("usage: ctr-demo SHIM_CONFIG SHIM_DIR BUSYBOX_TAR WORK_DIR");
    };
    let work_dir = PathBuf::from(work_dir);
    std::fs::create_dir_all(&work_dir)?;
    let mut ctd = PrivateContainerd::start_in(
        ContainerdVersion::V2,
        Some(Path::new(shim_dir)),
        &[("CLH_SHIM_CONFIG", config)],
        &work_dir,
    )?;
    println!(
        "containerd 2.x running privately in {}",
        ctd.dir().display()
    );
    ctd.import_image(Path::new(image_tar), BUSYBOX)?;
    let cmd = [
        "run",
        "--runtime",
        "io.containerd.clh.v2",
        "--rm",
        BUSYBOX,
        "demo",
        "uname",
        "-r",
    ];
    println!("$ ctr {}", cmd.join(" "));
    let started = Instant::now();
    let out = ctd.ctr(&cmd)?;
    check(&out, "ctr run").context("ctr run failed")?;
    let release = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!(
        "{release}    (in {:.1?}; the host runs {})",
        started.elapsed(),
        host_release()
    );
    ensure!(
        release != host_release(),
        "the container saw the host's kernel"
    );
    ctd.stop()?;
    let leaks = ctd.leak_report();
    ensure!(leaks.is_empty(), "left behind: {leaks:#?}");
    println!("containerd stopped; nothing left behind");
    Ok(())
}

fn host_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
