//! The Cloud Hypervisor backend against a real `cloud-hypervisor` process:
//! start (create + boot), info, virtio-fs at boot and hot-plugged, stop, and
//! what stop must leave behind (nothing).
//!
//! The guest is a tiny PVH ELF written by the test (its code is `hlt`,
//! [`write_pvh_kernel`]), so the test needs no kernel build and does not
//! depend on whether a real guest can run on this host: what it checks is
//! the API, the VMM process and the cleanup.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clh_hypervisor::ch::api::{FsConfig, VmState};
use clh_hypervisor::ch::CloudHypervisor;
use clh_hypervisor::virtiofsd::Virtiofsd;
use clh_hypervisor::wait::wait_until;
use clh_hypervisor::{Error, Hypervisor, SharedFs, VmSize, VmSpec};
use clh_tests::pvh::write_pvh_kernel;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `cloud-hypervisor` on PATH, or `None` after recording the skip.
fn cloud_hypervisor() -> Option<PathBuf> {
    let found = find_on_path("cloud-hypervisor");
    if found.is_none() {
        clh_test_skip::skip(
            "cloud-hypervisor not found on PATH (install it to run the CH API tests)",
        );
    }
    found
}

fn virtiofsd() -> PathBuf {
    find_on_path("virtiofsd")
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let cargo_bin = Path::new(&home).join(".cargo/bin/virtiofsd");
            cargo_bin.is_file().then_some(cargo_bin)
        })
        .expect("virtiofsd is needed for the virtio-fs part of this test: put it on PATH")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A state directory under /tmp: its sockets must fit in `sun_path`.
fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("chapi")
        .tempdir_in("/tmp")
        .expect("create a temporary directory in /tmp")
}

fn vm_spec(dir: &Path, kernel: PathBuf, shared_fs: Option<SharedFs>) -> VmSpec {
    let initramfs = dir.join("initramfs");
    std::fs::write(&initramfs, [0u8; 512]).expect("write the test initramfs");
    VmSpec {
        id: "ch-api-test".into(),
        memory_mib: 256,
        kernel,
        initramfs,
        cmdline: "console=ttyS0".into(),
        shared_fs,
        start_timeout: START_TIMEOUT,
        ..VmSpec::for_test(dir)
    }
}

async fn start_virtiofsd(dir: &Path, name: &str) -> Virtiofsd {
    let shared = dir.join(format!("{name}-dir"));
    std::fs::create_dir(&shared).expect("create the shared directory");
    Virtiofsd::start(
        &virtiofsd(),
        &shared,
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.log")),
        Duration::from_secs(10),
    )
    .await
    .expect("start virtiofsd")
}

fn pid_exists(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// What every test checks after `stop`: the VMM is gone and left nothing.
async fn assert_cleaned_up(dir: &Path, vmm_pid: u32) {
    assert!(
        !pid_exists(vmm_pid),
        "cloud-hypervisor pid {vmm_pid} still exists"
    );
    for socket in ["ch-api.sock", "vsock.sock"] {
        assert!(!dir.join(socket).exists(), "{socket} was not removed");
    }
    assert_no_process_mentions(dir).await;
}

/// Our own children are reaped by the time `stop` returns, but virtiofsd's
/// sandboxed child is not ours: it gets SIGKILL (parent-death signal) when
/// virtiofsd exits and may need a moment to go. A real leak stays.
async fn assert_no_process_mentions(dir: &Path) {
    let gone = wait_until(
        "processes using the test directory to exit",
        Duration::from_secs(5),
        || async { processes_mentioning(dir).is_empty().then_some(()) },
    )
    .await;
    assert!(
        gone.is_ok(),
        "processes left behind: {:?}",
        processes_mentioning(dir)
    );
}

#[tokio::test]
async fn start_info_add_fs_and_stop_against_real_cloud_hypervisor() {
    let Some(binary) = cloud_hypervisor() else {
        return;
    };
    let dir = short_tempdir();
    let kernel = dir.path().join("vmlinux");
    write_pvh_kernel(&kernel, b"");
    let mut boot_fs = start_virtiofsd(dir.path(), "fs0").await;
    let shared_fs = SharedFs {
        socket: boot_fs.socket().to_path_buf(),
        tag: "boot".into(),
    };
    let spec = vm_spec(dir.path(), kernel, Some(shared_fs));

    let mut ch = CloudHypervisor::new(binary);
    let started = ch.start(&spec).await;
    let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap_or_default();
    started.unwrap_or_else(|e| panic!("start failed: {e}\nvmm.log:\n{log}"));
    let version = ch.version().expect("ping result recorded").clone();
    println!(
        "cloud-hypervisor {} ({})",
        version.version, version.build_version
    );
    let [vmm_pid] = ch.pids()[..] else {
        panic!("expected exactly the VMM pid, got {:?}", ch.pids());
    };
    assert_eq!(ch.vsock_socket(), dir.path().join("vsock.sock"));
    assert!(
        ch.vsock_socket().exists(),
        "CH did not create the vsock socket"
    );

    let info = ch.info().await.unwrap();
    println!("state after boot: {:?}", info.state);
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.cpus.map(|c| c.boot_vcpus), Some(1));
    let memory = info.config.memory.as_ref().expect("memory config");
    assert_eq!((memory.size, memory.shared), (256 << 20, Some(true)));
    assert_eq!(info.config.fs.as_ref().map(Vec::len), Some(1));

    let mut hot_fs = start_virtiofsd(dir.path(), "fs1").await;
    let mut fs = FsConfig::new("hot", hot_fs.socket());
    fs.id = Some("hotfs".into());
    let device = ch.add_fs(fs).await.unwrap();
    println!("hot-plugged virtio-fs: {device:?}");
    assert_eq!(device.map(|d| d.id).as_deref(), Some("hotfs"));
    let info = ch.info().await.unwrap();
    assert_eq!(info.config.fs_tags(), ["boot", "hot"]);
    ch.counters().await.unwrap();

    let stop_started = Instant::now();
    ch.stop(STOP_TIMEOUT).await.unwrap();
    println!("stop took {:?}", stop_started.elapsed());
    assert!(stop_started.elapsed() <= STOP_TIMEOUT + Duration::from_secs(2));
    ch.stop(STOP_TIMEOUT).await.expect("stop is idempotent");
    assert!(ch.pids().is_empty());
    boot_fs.stop(Duration::from_secs(5)).await.unwrap();
    hot_fs.stop(Duration::from_secs(5)).await.unwrap();
    assert_cleaned_up(dir.path(), vmm_pid).await;
}

#[tokio::test]
async fn a_missing_kernel_fails_start_with_ch_error_and_leaves_nothing() {
    let Some(binary) = cloud_hypervisor() else {
        return;
    };
    let dir = short_tempdir();
    let spec = vm_spec(dir.path(), dir.path().join("no-such-vmlinux"), None);
    let mut ch = CloudHypervisor::new(binary);

    let started = Instant::now();
    let err = ch
        .start(&spec)
        .await
        .expect_err("start with a missing kernel");
    let elapsed = started.elapsed();
    println!("start failed as expected after {elapsed:?}: {err}");
    assert!(elapsed < START_TIMEOUT, "took {elapsed:?}");
    match &err {
        Error::Api { endpoint, body, .. } => {
            // CH opens the kernel when it boots the VM, not at create.
            assert_eq!(*endpoint, "vm.boot");
            // CH's own explanation, from its error body.
            assert!(body.contains("Cannot open kernel file"), "{body}");
        }
        other => panic!("expected CH's API error, got {other:?}"),
    }

    // start stops what it spawned before returning the error.
    assert!(ch.pids().is_empty(), "VMM still running: {:?}", ch.pids());
    assert_no_process_mentions(dir.path()).await;
    for socket in ["ch-api.sock", "vsock.sock"] {
        assert!(
            !dir.path().join(socket).exists(),
            "{socket} was not removed"
        );
    }
}

/// vm.resize on a running VM created with room to grow: CH accepts a vCPU
/// hot-add and ACPI memory DIMMs, one after another, and vm.info shows them.
/// The test guest only halts, so this checks what CH accepts and plugs, not
/// what a Linux guest makes of it (onlining is the guest's business).
#[tokio::test]
async fn resize_grows_vcpus_and_memory_within_the_max_against_real_cloud_hypervisor() {
    let Some(binary) = cloud_hypervisor() else {
        return;
    };
    let dir = short_tempdir();
    let kernel = dir.path().join("vmlinux");
    write_pvh_kernel(&kernel, b"");
    let mut spec = vm_spec(dir.path(), kernel, None);
    let max = VmSize {
        vcpus: 2,
        memory_mib: 1024,
    };
    spec.max = Some(max);

    let mut ch = CloudHypervisor::new(binary);
    let started = ch.start(&spec).await;
    let log = || std::fs::read_to_string(dir.path().join("vmm.log")).unwrap_or_default();
    started.unwrap_or_else(|e| panic!("start failed: {e}\nvmm.log:\n{}", log()));
    let [vmm_pid] = ch.pids()[..] else {
        panic!("expected exactly the VMM pid, got {:?}", ch.pids());
    };

    // Both at once: a second vCPU and 100 MiB, which becomes one 128 MiB DIMM.
    let grown = ch
        .resize(VmSize {
            vcpus: 2,
            memory_mib: 356,
        })
        .await
        .unwrap_or_else(|e| panic!("resize failed: {e}\nvmm.log:\n{}", log()));
    assert_eq!(
        grown,
        VmSize {
            vcpus: 2,
            memory_mib: 384
        }
    );
    // More DIMMs, each behind its own address gap, up to the max.
    for memory_mib in [512, 1024] {
        let target = VmSize {
            vcpus: 2,
            memory_mib,
        };
        let grown = ch
            .resize(target)
            .await
            .unwrap_or_else(|e| panic!("resize to {target} failed: {e}\nvmm.log:\n{}", log()));
        assert_eq!(grown, target);
    }
    let info = ch.info().await.unwrap();
    println!(
        "after resize: {:?}, memory_actual_size {:?}",
        info.config.cpus, info.memory_actual_size
    );
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.cpus.map(|c| c.boot_vcpus), Some(2));
    assert_eq!(info.memory_actual_size, Some(1024 << 20));

    // Never shrinks; beyond the max is refused before CH is asked.
    let same = ch
        .resize(VmSize {
            vcpus: 1,
            memory_mib: 256,
        })
        .await
        .unwrap();
    assert_eq!(same, max);
    let err = ch
        .resize(VmSize {
            vcpus: 3,
            memory_mib: 1024,
        })
        .await
        .expect_err("a resize beyond the max");
    assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");

    ch.stop(STOP_TIMEOUT).await.unwrap();
    assert_cleaned_up(dir.path(), vmm_pid).await;
}
