//! QEMU VMs restored from a template (docs/design/0004-vm-templates.md),
//! at the backend level: the real guest image booted once without per-pod
//! devices and saved with `save_template`, then two VMs restored from that
//! one file at once, each with its own hot-plugged vsock device and
//! vhost-device-vsock, answering the agent's Version and Check; one also
//! gets a virtio-fs device hot-plugged on a real virtiofsd. Both
//! clones run at the same time; each is seeded with host entropy
//! (SeedRandom, as the shim does first) and then reports the boot id it
//! generated after that (the template never read one), so they differ:
//! without SeedRandom they were the same, the clones' RNG state being the
//! template's. A leak check follows.
//!
//! Needs the guest image, qemu-system-x86_64 and vhost-device-vsock; a
//! missing one fails the test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clh_agent_client::AgentClient;
use clh_agent_protocol::PROTOCOL_VERSION;
use clh_hypervisor::qemu::{save_template, Qemu};
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{Hypervisor, SharedFs, VmSpec};
use clh_tests::{binaries, state_root, GuestImage, LeakCheck};

const START_TIMEOUT: Duration = Duration::from_secs(90);
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The machine a template and its restores share: what the shim boots.
fn machine(image: &GuestImage, dir: &Path, id: &str) -> VmSpec {
    std::fs::create_dir_all(dir).expect("the VM directory");
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: image.vmlinuz.clone(),
        initramfs: image.initramfs.clone(),
        cmdline: "console=ttyS0 panic=-1 quiet".into(),
        start_timeout: START_TIMEOUT,
        free_page_reporting: true,
        ..VmSpec::for_test(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_restored_from_one_template_answer_with_their_own_boot_ids() {
    let image = GuestImage::locate().unwrap();
    let bins = binaries();
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());

    let snapshot = root.path().join("template.snap");
    let began = Instant::now();
    let spec = machine(&image, &root.path().join("template"), "template");
    save_template(&bins.qemu, &spec, &snapshot).await.unwrap();
    eprintln!("template booted and saved in {:?}", began.elapsed());
    assert!(snapshot.is_file());

    // Clone "a" gets a virtio-fs device too, on a real virtiofsd.
    let shared = root.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let fs_socket = root.path().join("fs.sock");
    let mut virtiofsd = Virtiofsd::start(
        &bins.virtiofsd,
        &shared,
        &fs_socket,
        &root.path().join("virtiofsd.log"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let restore = |id: &'static str| {
        let dir: PathBuf = root.path().join(id);
        let spec = VmSpec {
            restore_from: Some(snapshot.clone()),
            shared_fs: (id == "a").then(|| SharedFs {
                socket: fs_socket.clone(),
                tag: "clh-shared".into(),
            }),
            ..machine(&image, &dir, id)
        };
        let mut qemu = Qemu::new(bins.qemu.clone(), bins.vhost_device_vsock.clone());
        async move {
            let began = Instant::now();
            let started = qemu.start(&spec).await;
            let ready = qemu.wait_vsock_ready(AGENT_TIMEOUT).await;
            let agent = AgentClient::connect(&qemu.vsock_socket(), AGENT_TIMEOUT).await;
            eprintln!("{id}: spawn -> agent connected {:?}", began.elapsed());
            (qemu, started, ready, agent)
        }
    };
    let ((mut a, a_started, a_ready, a_agent), (mut b, b_started, b_ready, b_agent)) =
        tokio::join!(restore("a"), restore("b"));
    let mut boot_ids = Vec::new();
    for (started, ready, agent) in [(a_started, a_ready, a_agent), (b_started, b_ready, b_agent)] {
        started.unwrap();
        assert!(ready, "the hot-plugged vsock was ready at once");
        let agent = agent.unwrap();
        let version = agent.version().await.unwrap();
        assert_eq!(version.protocol_version, PROTOCOL_VERSION);
        // What the shim sends first: fresh host entropy, which must reseed
        // the CRNG the clones share with their template.
        let mut seed = [0u8; 64];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut seed)
            .unwrap();
        agent.seed_random(&seed).await.unwrap();
        let check = agent.check().await.unwrap();
        assert_eq!(check.kernel_release, image.kernel_release);
        boot_ids.push(check.boot_id);
    }
    assert_eq!(a.pids().len(), 2, "qemu and vhost-device-vsock");
    assert_ne!(boot_ids[0], boot_ids[1], "each clone made its own boot id");

    a.stop(Duration::from_secs(5)).await.unwrap();
    b.stop(Duration::from_secs(5)).await.unwrap();
    virtiofsd.stop(Duration::from_secs(5)).await.unwrap();
    let fs_log = std::fs::read_to_string(root.path().join("virtiofsd.log")).unwrap();
    assert!(
        fs_log.contains("Client connected"),
        "the hot-plugged virtio-fs device never reached virtiofsd: {fs_log}"
    );
    std::fs::remove_dir_all(&shared).unwrap();
    std::fs::remove_file(root.path().join("virtiofsd.log")).unwrap();
    // The backend leaves only its logs in a VM directory (the shim removes
    // the directory); the template's files are this test's own.
    for id in ["a", "b", "template"] {
        let dir = root.path().join(id);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.ends_with(".log"), "{} left behind", path.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_file(&snapshot).unwrap();
    leaks.assert_clean().await;
}
