//! ConfigMap-style volumes reach a container in a real guest (QEMU TCG)
//! through volume sync: a host directory laid out by the kubelet's atomic
//! writer, a `VolumeSync` pushing it to the agent, a container mounting the
//! guest copy and watching it with inotify. The kubelet's atomic update is
//! reproduced on the host; the container must see the new set, whole,
//! within 1 s, through an inotify event.
//!
//! Needs the guest image (`make guest-image`), busybox-static
//! (`packaging/install-containerd.sh`) and gcc with a static libc (the
//! busybox build has no inotify applet: `tests/images/inotify-wait.c`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_agent_client::{open_stdio_stream, Stdio, StdioKind};
use clh_agent_protocol::GUEST_SHARED_DIR;
use clh_tests::atomic_writer::{atomic_write, build_inotify_wait};
use clh_tests::{qemu_options, state_root, GuestImage, LeakCheck};
use containerd_shim_clh_v2::service::volume_sync;
use containerd_shim_clh_v2::shared_mount::private_dir;
use containerd_shim_clh_v2::vm::PodVm;
use oci_spec::runtime::{MountBuilder, RootBuilder, Spec};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::UnixStream;

/// TCG is slow; no single step should take longer.
const STEP: Duration = Duration::from_secs(60);
/// The target: an update is in the container within this.
const UPDATE_DEADLINE: Duration = Duration::from_secs(1);
const CID: &str = "vols";

/// A busybox rootfs with `inotify-wait` compiled into it.
fn make_rootfs(shared: &Path) -> Result<()> {
    let rootfs = shared.join(CID).join("rootfs");
    let dirs = ["proc", "sys", "dev", "tmp", "etc", "vol"];
    clh_tests::ctr::busybox_rootfs(&rootfs, &dirs, &["sh", "cat", "echo", "ls", "wc"])?;
    build_inotify_wait(&rootfs.join("bin/inotify-wait"))?;
    Ok(())
}

/// The container: on each `..data` event in /vol, a line with the event,
/// then one with what it then sees there.
fn spec_json(guest_dir: &str) -> Result<Vec<u8>> {
    let mut spec = Spec::default();
    let root = format!("{GUEST_SHARED_DIR}/{CID}/rootfs");
    spec.set_root(Some(
        RootBuilder::default().path(root).readonly(false).build()?,
    ));
    // `echo $ev` is a builtin: the event's line leaves at once; reading the
    // files takes a few fork/execs, slow under TCG.
    let script = "inotify-wait /vol ..data | while read ev; do echo \"$ev\"; \
                  echo \"a=$(cat /vol/a) keys=$(echo $(ls /vol)) big=$(cat /vol/big 2>/dev/null | wc -c)\"; \
                  done";
    let mut process = spec
        .process()
        .clone()
        .context("default spec has a process")?;
    process.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
    process.set_terminal(Some(false));
    process.set_env(Some(vec!["PATH=/bin".into()]));
    spec.set_process(Some(process));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination("/vol")
            .typ("bind")
            .source(guest_dir)
            .options(vec!["rbind".into(), "ro".into()])
            .build()?,
    );
    spec.set_mounts(Some(mounts));
    Ok(serde_json::to_vec(&spec)?)
}

async fn next_line(lines: &mut Lines<BufReader<UnixStream>>, deadline: Duration) -> Result<String> {
    let line = tokio::time::timeout(deadline, lines.next_line())
        .await
        .with_context(|| format!("no line from the container within {deadline:?}"))??;
    line.context("the container's stdout ended")
}

/// What one update took: until the agent had committed it (host side),
/// and until the container's inotify watch fired.
struct Timing {
    committed: Duration,
    event: Duration,
}

/// Reproduces an update on the host; returns the line the container
/// printed for what it then saw, and the timing.
async fn update(
    lines: &mut Lines<BufReader<UnixStream>>,
    sync: &volume_sync::VolumeSync,
    host: &Path,
    serial: u32,
    files: &[(&str, &[u8])],
) -> Result<(String, Timing)> {
    let mut pushed = sync.pushed();
    pushed.borrow_and_update();
    let t0 = Instant::now();
    atomic_write(host, serial, files)?;
    let event = next_line(lines, STEP).await?;
    let event_at = t0.elapsed();
    ensure!(
        event == "..data",
        "expected the ..data event, got {event:?}"
    );
    tokio::time::timeout(STEP, pushed.changed()).await??;
    let committed = pushed.borrow().at.saturating_duration_since(t0);
    let seen = next_line(lines, STEP).await?;
    let timing = Timing {
        committed,
        event: event_at,
    };
    println!(
        "update {serial}: committed in the guest after {:?}, inotify event in the container after {:?}",
        timing.committed, timing.event
    );
    Ok((seen, timing))
}

async fn run(vm: &PodVm, host: &Path) -> Result<()> {
    let uds = vm.vsock_socket().to_path_buf();
    let agent = vm.agent().clone();
    vm.agent().version().await?;

    atomic_write(host, 1, &[("a", b"1"), ("b", b"1")])?;
    ensure!(
        volume_sync::is_synced_volume(host),
        "the host dir is not recognised"
    );
    let sync = volume_sync::start(agent, host.to_path_buf(), CID, 0, Default::default()).await?;
    let guest_dir = sync.guest_dir().to_owned();
    ensure!(guest_dir == volume_sync::guest_dir(CID, 0), "{guest_dir}");

    make_rootfs(&private_dir(vm.dir()))?;
    let stdio = Stdio {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    vm.agent()
        .create_container(CID, &spec_json(&guest_dir)?, stdio)
        .await?;
    let out = open_stdio_stream(&uds, CID, "", StdioKind::Stdout).await?;
    let _err = open_stdio_stream(&uds, CID, "", StdioKind::Stderr).await?;
    vm.agent().start_process(CID, "").await?;
    let mut lines = BufReader::new(out).lines();
    // inotify-wait's "ready" goes through the loop too: the first snapshot.
    let ready = next_line(&mut lines, STEP).await?;
    ensure!(ready == "ready", "{ready:?}");
    let first = next_line(&mut lines, STEP).await?;
    ensure!(first == "a=1 keys=a b big=0", "{first:?}");

    // A ConfigMap update: a changed, b removed, c added.
    let (line, small) = update(&mut lines, &sync, host, 2, &[("a", b"2"), ("c", b"2")]).await?;
    ensure!(line == "a=2 keys=a c big=0", "{line:?}");
    ensure!(
        small.event < UPDATE_DEADLINE,
        "the container saw the update after {:?}",
        small.event
    );

    // 5 MiB: several SyncVolume calls for one generation.
    let big = vec![b'x'; 5 << 20];
    let files: [(&str, &[u8]); 2] = [("a", b"3"), ("big", &big)];
    let (line, _) = update(&mut lines, &sync, host, 3, &files).await?;
    let want = format!("a=3 keys=a big big={}", big.len());
    ensure!(line == want, "{line:?}");

    vm.agent().signal_process(CID, "", 9, true).await?;
    tokio::time::timeout(STEP, vm.agent().wait_process(CID, "")).await??;
    vm.agent().remove_container(CID).await?;
    sync.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_updates_reach_the_container_whole_and_fire_inotify() {
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let host = tempfile::tempdir().unwrap();
    let leaks = LeakCheck::new(root.path());
    let vm = PodVm::start("vols", root.path(), &qemu_options(&image))
        .await
        .unwrap();
    let result = run(&vm, host.path()).await;
    clh_tests::stop_vm_and_report(vm, result).await;
    leaks.assert_clean().await;
}
