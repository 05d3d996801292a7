//! Containers in VMs restored from a template (`[runtime] templates =
//! true`; docs/design/0004-vm-templates.md), through ctr, containerd 2.x
//! and the real shim: `template make` makes the template ahead (once,
//! however often it runs), both pods' QEMU
//! restore from it (`-incoming defer` on their command lines), their
//! containers run from the rootfs on the hot-plugged virtio-fs, and their
//! boot ids differ. A truncated template makes the next pod boot instead
//! and is discarded; the pod after makes a new one. A changed initramfs
//! makes a second template, one for three pods started at once; that
//! initramfs rewritten, the next pod's new template replaces the stale
//! one. The leak checks end it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{self, boot_id, finish, run, run_sleeper, setup, Setup};
use clh_tests::templates;

fn start(s: &Setup) -> Result<PrivateContainerd> {
    ctr::start(
        ContainerdVersion::V2,
        s,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
}

/// `containerd-shim-clh-v2 template make --config`, not yet run.
fn template_make(s: &Setup) -> Result<std::process::Command> {
    let shim = ctr::shim_dir()?.join("containerd-shim-clh-v2");
    let mut cmd = std::process::Command::new(&shim);
    cmd.args(["template", "make", "--config"]).arg(&s.config);
    Ok(cmd)
}

/// `containerd-shim-clh-v2 template make --config`: the template's path.
fn make_template(s: &Setup) -> Result<PathBuf> {
    let out = template_make(s)?.output()?;
    check(&out, "containerd-shim-clh-v2 template make")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .trim()
        .strip_prefix("template ready: ")
        .with_context(|| format!("template make printed {text:?}"))?;
    Ok(PathBuf::from(path))
}

fn echo_through(ctd: &PrivateContainerd, id: &str) -> Result<()> {
    let out = run(ctd, &[id, "sh", "-c", "echo from-the-rootfs"])?;
    check(&out, &format!("ctr run {id}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("from-the-rootfs"), "{id}: {text:?}");
    Ok(())
}

#[test]
fn containers_run_in_vms_restored_from_one_template() -> Result<()> {
    let s = setup()?;
    let store_dir = templates::enable(&s)?;
    let store = store_dir.path();
    let ctd = start(&s)?;

    // Made ahead by the command, once however often it runs.
    let made_ahead = [make_template(&s)?, make_template(&s)?];
    ensure!(made_ahead[0] == made_ahead[1], "{made_ahead:?}");

    // Two pods at a time, both restored from the template made ahead.
    run_sleeper(&ctd, "t1")?;
    run_sleeper(&ctd, "t2")?;
    let restored = templates::restored_vms(&s.state_dir);
    ensure!(
        restored.len() == 2,
        "QEMUs restoring a template: {restored:?}"
    );
    let made = templates::ready(store)?;
    ensure!(
        made.len() == 1 && made_ahead[0].starts_with(&made[0]),
        "templates: {made:?}, made ahead: {made_ahead:?}"
    );
    let log = std::fs::read_to_string(ctd.log_path())?;
    ensure!(
        !log.contains("made a VM template"),
        "a pod made a template although one was made ahead"
    );
    let (a, b) = (boot_id(&ctd, "t1")?, boot_id(&ctd, "t2")?);
    ensure!(a != b, "two restored VMs share the boot id {a}");
    ctr::kill_and_remove(&ctd, "t1")?;
    ctr::kill_and_remove(&ctd, "t2")?;
    echo_through(&ctd, "t3")?;

    // A truncated template: the pod boots instead, and the template goes.
    let snapshot = made[0].join("snapshot");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&snapshot)?
        .set_len(4096)?;
    echo_through(&ctd, "t4")?;
    ensure!(
        !made[0].exists(),
        "the failed template {} is still there",
        made[0].display()
    );
    echo_through(&ctd, "t5")?;
    let made_first = templates::ready(store)?;
    ensure!(made_first.len() == 1, "no new template");

    // A changed initramfs is a new template, and pods started at once for
    // it make one between them.
    let initramfs = store.join("initramfs-copy.cpio.gz");
    std::fs::copy(&s.image.initramfs, &initramfs)?;
    let config = std::fs::read_to_string(&s.config)?;
    let old = format!("initramfs = \"{}\"", s.image.initramfs.display());
    ensure!(config.contains(&old), "{config}");
    let new = format!("initramfs = \"{}\"", initramfs.display());
    std::fs::write(&s.config, config.replace(&old, &new)).context("the shim config")?;
    let ids = ["c1", "c2", "c3"];
    let started: Vec<Result<()>> = std::thread::scope(|scope| {
        let ctd = &ctd;
        let threads: Vec<_> = ids
            .iter()
            .map(|id| scope.spawn(move || run_sleeper(ctd, id)))
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect()
    });
    for result in started {
        result?;
    }
    ensure!(
        templates::ready(store)?.len() == 2,
        "pods started at once for a new initramfs did not make exactly one template"
    );
    // Made by pods: the replacement after the truncation, and one for the
    // new initramfs, whatever the three pods at once raced for.
    let log = std::fs::read_to_string(ctd.log_path())?;
    let made = log.matches("made a VM template").count();
    ensure!(made == 2, "{made} templates made by pods, not 2");
    for id in ids {
        ctr::kill_and_remove(&ctd, id)?;
    }

    // The copy rewritten: its template is stale and goes when the next pod
    // makes a new one, with a dead maker's build directory; the template
    // of the original initramfs stays.
    let for_copy = templates::ready(store)?
        .into_iter()
        .find(|t| !made_first.contains(t))
        .context("the template of the copy")?;
    let dead_maker = store.join("0123456789abcdef.build");
    std::fs::create_dir(&dead_maker)?;
    std::fs::remove_file(&initramfs)?;
    std::fs::copy(&s.image.initramfs, &initramfs)?;
    echo_through(&ctd, "t6")?;
    let now = templates::ready(store)?;
    ensure!(
        now.len() == 2 && !now.contains(&for_copy) && !dead_maker.exists(),
        "after a rewritten initramfs: {now:?}, dead maker's left: {}",
        dead_maker.exists()
    );

    finish(ctd, &s)
}

/// Polls `cond` every 20 ms until it holds, for at most `within`.
fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !cond() {
        ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A maker killed while its template VM boots (a shim SIGKILLed during a
/// pod's first start is the same process tree): its QEMU dies with it
/// (PR_SET_PDEATHSIG), no template is left half made, and the next maker
/// makes a whole one.
#[test]
fn a_template_maker_killed_midway_leaves_no_vm_and_no_template() -> Result<()> {
    let s = setup()?;
    let store_dir = templates::enable(&s)?;
    let store = store_dir.path();
    let mut maker = template_make(&s)?.spawn()?;
    let qemus = || ctr::vm_processes("qemu-system-x86_64", store);
    let seen = wait_until("the template's QEMU", Duration::from_secs(60), || {
        !qemus().is_empty()
    });
    maker.kill()?;
    maker.wait()?;
    seen?;
    wait_until(
        "the template's QEMU to die with its maker",
        Duration::from_secs(10),
        || qemus().is_empty(),
    )?;
    ensure!(templates::ready(store)?.is_empty(), "a template was left");
    let made = make_template(&s)?;
    ensure!(made.is_file(), "{}", made.display());
    let left: Vec<_> = std::fs::read_dir(store)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".build"))
        .collect();
    ensure!(left.is_empty(), "build directories left: {left:?}");
    Ok(())
}
