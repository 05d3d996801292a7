//! A container trying to exhaust its pod's shim through exec, via CRI with
//! the `clh` handler and a real guest:
//!
//! - `sec_dos_01_an_exec_output_flood_leaves_the_shim_bounded` (SEC-DOS-01,
//!   CVE-2022-31030): 15 MiB of `yes` through ExecSync arrive whole, then
//!   `yes` runs until ExecSync's 10 s timeout. The shim's resident memory
//!   stays within [`RSS_GROWTH_MAX`] of what it was, the flooding process
//!   is gone from the guest once the call returns, and the pod still
//!   answers.
//! - `sec_dos_03_an_exec_storm_keeps_the_pod_answering` (SEC-DOS-03,
//!   containerd#2709): [`STORM`] ExecSync calls at once all finish, each
//!   with its own output, while ContainerStatus keeps answering.
//!
//! Each ends with the CRI and shim leak checks. Run one at a time
//! (`-- --test-threads=1`): each boots a VM.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet};
use clh_tests::ctr;

const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the flood runs: ExecSync's own timeout.
const FLOOD: Duration = Duration::from_secs(10);
/// How much the shim's RSS may grow over a flood: what its pumps hold in
/// flight, far below what 10 s of `yes` writes.
const RSS_GROWTH_MAX: u64 = 64 << 20;
/// A flood that ends by itself, all of which containerd returns (it caps
/// ExecSync's output at 16 MiB): what surely passed through the shim.
const SIZED_FLOOD: usize = 15 << 20;
/// Concurrent ExecSync calls in the storm.
const STORM: usize = 32;

/// The shim's setup (kept alive: it owns the state dirs) and CRI's.
fn cri_setup() -> (ctr::Setup, CriSetup) {
    ctr::default_cri_test_setup(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// VmRSS of `pid`, in bytes.
fn rss(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))?;
    Ok(kib << 10)
}

#[test]
fn sec_dos_01_an_exec_output_flood_leaves_the_shim_bounded() {
    let (_shim, cri) = cri_setup();
    output_flood(&cri).unwrap();
}

fn output_flood(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("flood"))?;
    let app = k.run_container(&pod, &ContainerBuilder::sleeper("app"))?;
    k.sh_within(&app, "echo warm", EXEC_TIMEOUT)?;
    let shims = k.containerd().shims();
    let [shim] = shims[..] else {
        anyhow::bail!("expected one shim, found {shims:?}");
    };
    let before = rss(shim)?;
    let bounded = |what: &str| -> Result<()> {
        let now = rss(shim)?;
        println!(
            "shim RSS after {what}: {} KiB (before: {} KiB)",
            now >> 10,
            before >> 10
        );
        ensure!(
            now <= before + RSS_GROWTH_MAX,
            "the shim grew from {} to {} KiB over {what}",
            before >> 10,
            now >> 10
        );
        Ok(())
    };

    let sized = format!("yes flood | head -c {SIZED_FLOOD}");
    let started = std::time::Instant::now();
    let sized = (k.cri()).exec_sync(&app, &["sh", "-c", &sized], EXEC_TIMEOUT)?;
    println!("{SIZED_FLOOD} bytes in {:?}", started.elapsed());
    ensure!(
        sized.exit_code == 0 && sized.stdout.len() == SIZED_FLOOD,
        "the sized flood: exit {}, {} of {SIZED_FLOOD} bytes",
        sized.exit_code,
        sized.stdout.len()
    );
    bounded("the sized flood")?;

    // containerd ends it at its timeout, with an error.
    match k.cri().exec_sync(&app, &["yes", "flood"], FLOOD) {
        Ok(r) => println!("flood: exit {}, {} bytes kept", r.exit_code, r.stdout.len()),
        Err(e) => println!("flood: {e:#}"),
    }
    bounded("the endless flood")?;
    k.cri()
        .wait_for("the flood's `yes` to be gone", EXEC_TIMEOUT, |c| {
            let ps = c.exec_sync(&app, &["ps", "-o", "comm"], EXEC_TIMEOUT)?;
            Ok((!ps.stdout.lines().any(|l| l.trim() == "yes")).then_some(()))
        })?;
    let alive = k.sh_within(&app, "echo alive", EXEC_TIMEOUT)?;
    ensure!(alive.trim() == "alive", "{alive}");
    k.remove_pod(&pod)?;
    k.finish()
}

#[test]
fn sec_dos_03_an_exec_storm_keeps_the_pod_answering() {
    let (_shim, cri) = cri_setup();
    exec_storm(&cri).unwrap();
}

fn exec_storm(setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("storm"))?;
    let app = k.run_container(&pod, &ContainerBuilder::sleeper("app"))?;
    let storming = AtomicBool::new(true);
    let (outputs, statuses) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| -> Result<usize> {
            let mut answered = 0;
            while storming.load(Ordering::Acquire) {
                k.cri().container_status(&app)?;
                answered += 1;
            }
            Ok(answered)
        });
        let calls: Vec<_> = (0..STORM)
            .map(|i| {
                let (k, app) = (&k, &app);
                scope.spawn(move || k.sh_within(app, &format!("echo exec-{i}"), EXEC_TIMEOUT))
            })
            .collect();
        let outputs: Vec<Result<String>> = calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect();
        storming.store(false, Ordering::Release);
        let statuses = watcher
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")));
        (outputs, statuses)
    });
    for (i, out) in outputs.into_iter().enumerate() {
        let out = out.with_context(|| format!("exec {i} of the storm"))?;
        ensure!(
            out.trim() == format!("exec-{i}"),
            "exec {i} printed {out:?}"
        );
    }
    let statuses = statuses.context("ContainerStatus during the storm")?;
    println!("{STORM} execs done; ContainerStatus answered {statuses} times meanwhile");
    ensure!(
        statuses > 0,
        "ContainerStatus never answered during the storm"
    );
    k.remove_pod(&pod)?;
    k.finish()
}
