//! Cloud Hypervisor templates (docs/design/0004-vm-templates.md, item 6)
//! against a real `cloud-hypervisor`, at API level: `ch::save_template`
//! boots a VM without vsock, virtio-fs or NIC, waits for the agent's
//! console line, pauses it and snapshots it into a directory; the
//! template is then moved (as the shim renames its build directory) and a
//! pod's CH restores it (`VmSpec::restore_from`), gets its own vsock and a
//! virtio-fs device on a real virtiofsd, and resumes. `vm.info` must show
//! the pod's devices; stop must leave nothing.
//!
//! The guest is the tiny PVH ELF of `clh_tests::pvh`, which prints the
//! agent's serving line on the serial port and halts: no kernel build, and
//! it runs where a stock Linux guest cannot (PVM hosts). NICs are not
//! covered here: they need a tap in a network namespace (root); the unit
//! tests check their `vm.add-net` bodies.
//!
//! Skipped, visibly, without `cloud-hypervisor` on PATH.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clh_hypervisor::ch::api::VmState;
use clh_hypervisor::ch::{save_template, CloudHypervisor};
use clh_hypervisor::console_log::AGENT_SERVING_MESSAGE;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::{Error, Hypervisor, SharedFs, VmSpec};
use clh_tests::pvh::write_pvh_kernel;
use clh_tests::{find_binary, state_root, LeakCheck};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `cloud-hypervisor` on PATH, or `None` after recording the skip.
fn cloud_hypervisor() -> Option<PathBuf> {
    let found = find_binary("cloud-hypervisor");
    if found.is_file() {
        return Some(found);
    }
    clh_test_skip::skip(
        "cloud-hypervisor not found on PATH (install it to run the CH template API tests)",
    );
    None
}

/// Whether `e` is CH failing to read a vCPU's nested state on a PVM host
/// (`kvm_pvm`), whose KVM answers KVM_GET_NESTED_STATE with EINVAL: CH's
/// vm.snapshot cannot work there at all, whatever we send.
fn pvm_cannot_snapshot(e: &Error) -> bool {
    Path::new("/sys/module/kvm_pvm").exists() && e.to_string().contains("GetNestedState")
}

/// The last checks of a test that cannot go on on this host: nothing
/// left, then the skip, visibly.
async fn leaks_then_skip(leaks: LeakCheck, root: &Path) {
    let entries = std::fs::read_dir(root).expect("listing the test's root");
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.expect("removing the test's files");
    }
    leaks.assert_clean().await;
    clh_test_skip::skip(
        "this host's KVM is PVM (kvm_pvm), which cannot report a vCPU's nested state, so Cloud Hypervisor's vm.snapshot fails (GetNestedState): the CH template round trip needs hardware KVM",
    );
}

/// The machine a template and its restores share, in the VM directory
/// `dir` (created).
fn machine(root: &Path, dir: &Path) -> VmSpec {
    std::fs::create_dir_all(dir).expect("create the VM directory");
    VmSpec {
        id: "ch-template-test".into(),
        kernel: root.join("vmlinux"),
        initramfs: root.join("initramfs"),
        cmdline: "console=ttyS0".into(),
        start_timeout: START_TIMEOUT,
        ..VmSpec::for_test(dir)
    }
}

/// The guest's files in `root`: a kernel that prints the agent's line.
fn write_guest(root: &Path) {
    let line = format!("agent: {AGENT_SERVING_MESSAGE} port 1024\n");
    write_pvh_kernel(&root.join("vmlinux"), line.as_bytes());
    std::fs::write(root.join("initramfs"), [0u8; 512]).expect("write the test initramfs");
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Whether the process `pid` has `file` open.
fn has_open(pid: u32, file: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
}

fn assert_gone(dir: &Path, names: &[&str]) {
    for name in names {
        assert!(!dir.join(name).exists(), "{name} left in {}", dir.display());
    }
}

#[tokio::test]
async fn a_saved_template_restores_with_the_pods_own_vsock_and_fs_against_real_cloud_hypervisor() {
    let Some(binary) = cloud_hypervisor() else {
        return;
    };
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    write_guest(root.path());

    // Made in a build directory, then moved into place, as the shim does.
    let build = root.path().join("t.build");
    let snapshot = build.join("snapshot");
    let template_spec = machine(root.path(), &build);
    let saved = save_template(&binary, &template_spec, &snapshot).await;
    let template_log = log_of(&build.join("template-vmm.log"));
    if let Err(e) = &saved {
        if pvm_cannot_snapshot(e) {
            // The failure path cleaned up: no VMM, socket or snapshot.
            assert_gone(&build, &["template-api.sock", "console.pipe", "snapshot"]);
            leaks_then_skip(leaks, root.path()).await;
            return;
        }
    }
    saved.unwrap_or_else(|e| panic!("save_template failed: {e}\nCH log:\n{template_log}"));
    let console = log_of(&build.join("console.log"));
    assert!(console.contains(AGENT_SERVING_MESSAGE), "{console:?}");
    for file in ["config.json", "state.json"] {
        assert!(snapshot.join(file).is_file(), "the snapshot has no {file}");
    }
    assert_gone(&build, &["template-api.sock", "console.pipe"]);
    let template = root.path().join("t");
    std::fs::rename(&build, &template).unwrap();

    // The pod: its own directory, vsock and virtiofsd.
    let pod = root.path().join("pod");
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let mut virtiofsd = Virtiofsd::start(
        &find_binary("virtiofsd"),
        &shared,
        &root.path().join("fs.sock"),
        &root.path().join("virtiofsd.log"),
        Duration::from_secs(10),
    )
    .await
    .expect("start virtiofsd (it must be on PATH or in ~/.cargo/bin)");
    let spec = VmSpec {
        restore_from: Some(template.join("snapshot")),
        shared_fs: Some(SharedFs {
            socket: virtiofsd.socket().to_path_buf(),
            tag: "clh-shared".into(),
        }),
        ..machine(root.path(), &pod)
    };
    let mut ch = CloudHypervisor::new(binary);
    let started = ch.start(&spec).await;
    let vmm_log = || log_of(&pod.join("vmm.log"));
    started.unwrap_or_else(|e| panic!("restore failed: {e}\nvmm.log:\n{}", vmm_log()));
    let [vmm_pid] = ch.pids()[..] else {
        panic!("expected exactly the VMM pid, got {:?}", ch.pids());
    };

    let info = ch.info().await.unwrap();
    println!("restored: {:?}, vsock {:?}", info.state, info.config.vsock);
    assert_eq!(info.state, VmState::Running);
    let vsock = info
        .config
        .vsock
        .as_ref()
        .expect("a vsock device after vm.add-vsock");
    assert_eq!((vsock.cid, &vsock.socket), (3, &pod.join("vsock.sock")));
    assert!(
        ch.vsock_socket().exists(),
        "CH did not bind the pod's vsock"
    );
    assert_eq!(info.config.fs_tags(), ["clh-shared"]);
    assert!(info.config.net.unwrap_or_default().is_empty());
    // The template's relative console path resolved in the pod's directory.
    let serial = info.config.serial.and_then(|s| s.file);
    assert_eq!(serial.as_deref(), Some(Path::new("console.pipe")));
    assert!(
        has_open(vmm_pid, &pod.join("console.pipe")),
        "the restored CH does not write the pod's console FIFO"
    );
    assert_gone(&template, &["console.pipe"]);
    ch.counters().await.unwrap();

    ch.stop(STOP_TIMEOUT).await.unwrap();
    assert!(ch.pids().is_empty());
    assert_gone(&pod, &["ch-api.sock", "vsock.sock", "console.pipe"]);
    virtiofsd.stop(Duration::from_secs(5)).await.unwrap();
    // What is left is files (logs, the snapshot); the leak check wants an
    // empty root besides no process and no mount.
    for dir in [&template, &pod, &shared] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    for file in ["vmlinux", "initramfs", "virtiofsd.log"] {
        std::fs::remove_file(root.path().join(file)).unwrap();
    }
    leaks.assert_clean().await;
}

/// A snapshot CH cannot read fails `start` with CH's reason from
/// `vm.restore` (the shim then boots cold), and leaves nothing behind.
#[tokio::test]
async fn a_broken_template_fails_the_restore_and_leaves_nothing_against_real_cloud_hypervisor() {
    let Some(binary) = cloud_hypervisor() else {
        return;
    };
    let root = state_root().unwrap();
    let leaks = LeakCheck::new(root.path());
    write_guest(root.path());
    let empty = root.path().join("empty-snapshot");
    std::fs::create_dir(&empty).unwrap();
    let pod = root.path().join("pod");
    let spec = VmSpec {
        restore_from: Some(empty.clone()),
        ..machine(root.path(), &pod)
    };
    let mut ch = CloudHypervisor::new(binary);
    let err = ch.start(&spec).await.expect_err("a restore from nothing");
    println!("restore failed as expected: {err}");
    match &err {
        Error::Api { endpoint, .. } => assert_eq!(*endpoint, "vm.restore"),
        other => panic!("expected CH's vm.restore error, got {other:?}"),
    }
    assert!(ch.pids().is_empty(), "VMM still running: {:?}", ch.pids());
    assert_gone(&pod, &["ch-api.sock", "vsock.sock", "console.pipe"]);
    for dir in [&pod, &empty] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    for file in ["vmlinux", "initramfs"] {
        std::fs::remove_file(root.path().join(file)).unwrap();
    }
    leaks.assert_clean().await;
}
