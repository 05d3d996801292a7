//! Tier-4 VM tests on the QEMU TCG backend: the real guest image booted
//! through `PodVm`, with a leak check after each test.
//!
//! Needs the guest image (`make guest-image`), qemu-system-x86_64, virtiofsd
//! and vhost-device-vsock. A missing image fails the tests; it never skips
//! them. The tests take one VM lock: TCG guests on a small host boot faster
//! one after another, and the leak check counts this process's VM children.

use std::path::Path;
use std::time::{Duration, Instant};

use clh_agent_protocol::PROTOCOL_VERSION;
use clh_tests::{qemu_options, state_root, GuestImage, LeakCheck};
use containerd_shim_clh_v2::vm::PodVm;
use tokio::sync::Mutex;

/// Tests that spawn VM processes run one at a time: TCG guests are slow on
/// 2 cores, and `LeakCheck` counts every VM-side child of this test binary,
/// so a test running beside another would see the other's processes.
static ONE_VM_TEST_AT_A_TIME: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_and_answers_version_and_check() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());

    let vm = PodVm::start("boot", root.path(), &qemu_options(&image))
        .await
        .unwrap();
    eprintln!(
        "QEMU spawn -> agent Version reply: {:?}",
        vm.boot_to_agent()
    );
    let version = vm.agent().version().await.unwrap();
    assert_eq!(version.protocol_version, PROTOCOL_VERSION);
    let check = vm.agent().check().await.unwrap();
    assert_eq!(check.kernel_release, image.kernel_release);
    assert!(!check.boot_id.trim().is_empty());
    assert!(check.agent_rss_kib > 0);
    assert!(vm.dir().join("state.json").is_file());
    assert_eq!(vm.pids().len(), 3, "qemu, vhost-device-vsock, virtiofsd");

    vm.stop().await.unwrap();
    leaks.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_at_once_have_different_boot_ids() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    let opts = qemu_options(&image);

    let (a, b) = tokio::join!(
        PodVm::start("a", root.path(), &opts),
        PodVm::start("b", root.path(), &opts)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ca, cb) = (
        a.agent().check().await.unwrap(),
        b.agent().check().await.unwrap(),
    );
    assert_ne!(ca.boot_id, cb.boot_id);

    a.stop().await.unwrap();
    b.stop().await.unwrap();
    leaks.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_agent_never_answers_fails_start_within_the_deadline() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    let mut opts = qemu_options(&image);
    // Its /init powers the guest off: no agent ever listens.
    opts.initramfs = image.bench_initramfs.clone();
    opts.agent_timeout = Duration::from_secs(60);

    let started = Instant::now();
    let err = PodVm::start("silent", root.path(), &opts)
        .await
        .err()
        .unwrap();
    let elapsed = started.elapsed();
    let msg = format!("{err:#}");
    assert!(
        elapsed < opts.agent_timeout + opts.vmm_start_timeout,
        "{elapsed:?}"
    );
    assert!(msg.contains("failed to start VM silent"), "{msg}");
    assert!(msg.contains("agent"), "{msg}");
    assert!(
        msg.contains("guest console"),
        "the console tail is missing: {msg}"
    );
    assert!(!root.path().join("silent").exists());
    leaks.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_kernel_path_fails_cleanly() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    let mut opts = qemu_options(&image);
    opts.kernel = Path::new("/nonexistent/vmlinuz").to_path_buf();

    let started = Instant::now();
    let err = PodVm::start("badkernel", root.path(), &opts)
        .await
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("/nonexistent/vmlinuz"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
    leaks.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_vm_directory_is_not_reused() {
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    std::fs::create_dir(root.path().join("taken")).unwrap();
    let err = PodVm::start("taken", root.path(), &qemu_options(&image))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("exists"), "{err:#}");
    assert!(
        PodVm::start("../escape", root.path(), &qemu_options(&image))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_virtiofsd_starts_sandboxed_and_stops_without_leftovers() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    let dir = root.path().join("fs");
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    let mut fs = clh_hypervisor::virtiofsd::Virtiofsd::start(
        &clh_tests::binaries().virtiofsd,
        &dir.join("shared"),
        &dir.join("fs.sock"),
        &dir.join("virtiofsd.log"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(fs.socket().exists());
    fs.stop(Duration::from_secs(5)).await.unwrap();
    assert!(!dir.join("fs.sock").exists());
    // stop returns only once the sandboxed worker is gone too, not later.
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let running = !stat.rsplit_once(") ")?.1.starts_with('Z');
            let ours = String::from_utf8_lossy(&cmdline).contains(dir.to_str()?);
            (running && ours).then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect();
    assert!(
        survivors.is_empty(),
        "still running after stop: {survivors:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    leaks.assert_clean().await;
}

/// Sends SIGCONT to a stopped process when dropped, so that a failing
/// assertion does not leave the VMM frozen.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn stop(pid: u32) -> Self {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A connect attempt given up while the guest is too slow to answer must
/// not wedge the VM's vsock. vhost-device-vsock forwards the request into
/// the guest, and when the guest accepts it writes `OK 1024` with
/// `write_all(..).unwrap()`: if our side had closed the socket meanwhile,
/// its vring worker panicked on EPIPE and no later CONNECT was ever
/// answered (the start failures seen under load: "no complete answer to
/// CONNECT 1024", 50 attempts in 120 s, with the agent listening). QEMU is
/// stopped here to make the guest slower than the attempt's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_given_up_while_the_guest_stalls_does_not_wedge_vsock() {
    let _serial = ONE_VM_TEST_AT_A_TIME.lock().await;
    let image = GuestImage::locate().unwrap();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());

    let vm = PodVm::start("stall", root.path(), &qemu_options(&image))
        .await
        .unwrap();
    let uds = vm.vsock_socket().to_path_buf();
    let qemu = vm.vmm_pid();
    let comm = std::fs::read_to_string(format!("/proc/{qemu}/comm")).unwrap();
    assert!(comm.starts_with("qemu-system"), "{comm}");

    let frozen = Frozen::stop(qemu);
    // vhost-device-vsock (its own process) reads the request and puts it in
    // the frozen guest's RX ring; the guest answers only after SIGCONT.
    let err = clh_agent_client::connect_hybrid_vsock(
        &uds,
        clh_agent_protocol::AGENT_VSOCK_PORT,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, clh_agent_client::HandshakeError::Timeout { .. }),
        "{err:?}"
    );
    drop(frozen);

    let log =
        || std::fs::read_to_string(vm.dir().join("vhost-device-vsock.log")).unwrap_or_default();
    let again = clh_agent_client::AgentClient::connect(&uds, Duration::from_secs(30)).await;
    let check = match again {
        Ok(agent) => agent.check().await,
        Err(e) => panic!(
            "vsock is wedged: {e:#}\n--- vhost-device-vsock log ---\n{}",
            log()
        ),
    };
    assert!(check.is_ok(), "{check:?}");
    assert!(!log().contains("panicked"), "{}", log());

    vm.stop().await.unwrap();
    leaks.assert_clean().await;
}
