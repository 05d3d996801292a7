//! The VM object without a guest: refusals, the failure report, the
//! crash cleanup and the modes of what it creates.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;

use super::leftovers::{persist_state, PersistedProcess, PersistedState};
use super::report::failure_report;
use super::steps::{kernel_cmdline, random_seed, restrict_sockets};
use super::*;
use crate::shared_mount::private_dir;
use clh_hypervisor::testing::{fake_ch, FAKE_CH_LINE};
use clh_hypervisor::{new_backend, VmSpec};

/// The rule itself is tested in clh-agent-protocol; here, that the VM
/// layer refuses a bad sandbox id before touching the disk.
#[tokio::test]
async fn a_bad_sandbox_id_is_refused_before_anything_is_created() {
    let root = tempfile::tempdir().unwrap();
    for bad in ["..", "../x", "a/b"] {
        let err = cleanup_leftovers(root.path(), bad).unwrap_err();
        assert!(format!("{err:#}").contains("invalid sandbox id"), "{err:#}");
        let Err(err) = PodVm::start(bad, root.path(), &test_options()).await else {
            panic!("{bad:?} accepted");
        };
        assert!(matches!(err.step, StartStep::InvalidId { .. }), "{err:?}");
        assert!(
            err.message().contains("invalid sandbox id"),
            "{}",
            err.message()
        );
    }
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_root_too_long_for_sockets_is_refused() {
    let root = PathBuf::from(format!("/tmp/{}", "r".repeat(90)));
    let Err(err) = PodVm::start("id", &root, &test_options()).await else {
        panic!("started");
    };
    assert!(
        err.message().contains("shorter state root"),
        "{}",
        err.message()
    );
    assert!(!root.exists());
}

/// Issue 10: the report of a Cloud Hypervisor start failure quotes
/// CH's own log (`vmm.log`, named by the backend, not by this file).
#[tokio::test]
async fn a_cloud_hypervisor_failure_report_quotes_its_vmm_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = test_options();
    opts.backend = Backend::CloudHypervisor;
    opts.binaries.cloud_hypervisor = fake_ch(dir.path());
    let spec = VmSpec::for_test(dir.path());
    let mut hypervisor = new_backend(opts.backend, &opts.binaries);
    assert!(hypervisor.start(&spec).await.is_err());
    let report = failure_report(dir.path(), opts.backend);
    assert!(report.contains(FAKE_CH_LINE), "{report}");
    let vmm_log = dir.path().join("vmm.log").display().to_string();
    assert!(report.contains(&format!("VMM log ({vmm_log})")), "{report}");
}

/// The same through [`PodVm::start`], with the real virtiofsd: the
/// start error quotes CH's log and nothing is left behind.
#[tokio::test]
async fn a_pod_vm_whose_cloud_hypervisor_fails_quotes_its_log() {
    let virtiofsd = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("virtiofsd"))
            .find(|p| p.is_file())
    });
    let Some(virtiofsd) = virtiofsd.filter(|_| nix::unistd::geteuid().is_root()) else {
        clh_test_skip::skip("needs root and virtiofsd on PATH");
        return;
    };
    let bin = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut opts = test_options();
    opts.backend = Backend::CloudHypervisor;
    opts.binaries.cloud_hypervisor = fake_ch(bin.path());
    opts.binaries.virtiofsd = virtiofsd;
    opts.vmm_start_timeout = Duration::from_secs(10);
    (opts.kernel, opts.initramfs) = guest_image(bin.path());
    let Err(err) = PodVm::start("pod", root.path(), &opts).await else {
        panic!("the fake Cloud Hypervisor started a VM");
    };
    let err = err.message();
    assert!(err.contains("the VMM did not start"), "{err}");
    assert!(err.contains("last lines of the VMM log"), "{err}");
    assert!(err.contains(FAKE_CH_LINE), "{err}");
    assert!(!root.path().join("pod").exists());
}

/// Polls (bounded) until `/proc/<pid>/cmdline` starts with `prefix`.
fn wait_for_cmdline(pid: u32, prefix: &[u8]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .starts_with(prefix)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} never exec'd"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn cleanup_kills_only_processes_with_the_recorded_command_line() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pod");
    std::fs::create_dir(&dir).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("999")
        .spawn()
        .unwrap();
    // Right after spawn the child may not have exec'd yet, and its
    // cmdline would still be this test binary's.
    for child in [&sleeper, &bystander] {
        wait_for_cmdline(child.id(), b"sleep\0");
    }
    persist_state(&dir, &[sleeper.id()], None).unwrap();
    // The bystander is recorded with someone else's command line, as a
    // recycled pid would be.
    let mut state: PersistedState =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    state.processes.push(PersistedProcess {
        pid: bystander.id(),
        cmdline: b"qemu-system-x86_64\0".to_vec(),
    });
    std::fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();

    cleanup_leftovers(root.path(), "pod").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = sleeper.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            sleeper.kill().unwrap();
            bystander.kill().unwrap();
            panic!("cleanup_leftovers did not kill the recorded process");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "bystander was killed"
    );
    assert!(!dir.exists());
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

/// Set in the child of the test below: the state root to clean up.
const LOCKED_ROOT_ENV: &str = "CLH_TEST_LOCKED_CLEANUP_ROOT";

/// Hole 9: a VM directory whose mounts cannot be detached (a mount
/// namespace owned by a user namespace inherits them locked: umount2
/// answers EINVAL, as if nothing were mounted). The crash cleanup runs
/// there, in a child; it must fail naming the mounts, and the canary
/// file in a volume mounted below must survive (remove_dir_all deleted
/// it through the mount).
#[test]
fn cleanup_never_deletes_through_a_mount_it_cannot_detach() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounts need root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pod");
    // The private tree, a mount as make_export makes it, with a volume;
    // no read-only export beside it, whose EROFS could stop a careless
    // removal before it reached the volume.
    let private = private_dir(&dir);
    let volume = private.join("c1/mounts/0");
    std::fs::create_dir_all(&volume).unwrap();
    let none = None::<&str>;
    let bind = nix::mount::MsFlags::MS_BIND;
    nix::mount::mount(Some(&private), &private, none, bind, none).unwrap();
    let tmpfs = nix::mount::MsFlags::empty();
    nix::mount::mount(Some("tmpfs"), &volume, Some("tmpfs"), tmpfs, none).unwrap();
    std::fs::write(volume.join("canary"), "host data").unwrap();
    let child = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "vm::tests::locked_cleanup_child", "--nocapture"])
        .env(LOCKED_ROOT_ENV, root.path())
        .output()
        .unwrap();
    let canary = std::fs::read_to_string(volume.join("canary"));
    let cleaned = crate::shared_mount::remove_vm_dir(&dir);
    let output = String::from_utf8_lossy(&child.stdout).into_owned();
    assert!(child.status.success(), "the child failed: {child:?}");
    assert_eq!(canary.unwrap(), "host data", "deleted through a mount");
    assert!(output.contains("CLEANUP-REFUSED"), "{output}");
    assert!(output.contains("still mounted there"), "{output}");
    assert!(output.contains(&private.display().to_string()), "{output}");
    cleaned.unwrap();
    assert!(!dir.exists());
}

/// The child of the test above, in its user and mount namespaces;
/// without the variable (a plain test run) it does nothing.
#[test]
fn locked_cleanup_child() {
    let Some(root) = std::env::var_os(LOCKED_ROOT_ENV) else {
        return;
    };
    match cleanup_leftovers(Path::new(&root), "pod") {
        Ok(()) => println!("CLEANUP-SUCCEEDED"),
        Err(e) => println!("CLEANUP-REFUSED: {e:#}"),
    }
}

#[test]
fn sockets_in_the_vm_dir_become_owner_only_and_links_are_not_followed() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let _ours = std::os::unix::net::UnixListener::bind(root.path().join("a.sock")).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(outside.path().join("b.sock")).unwrap();
    for dir in [root.path(), outside.path()] {
        let sock = std::fs::read_dir(dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::set_permissions(&sock, Permissions::from_mode(0o777)).unwrap();
    }
    std::os::unix::fs::symlink(outside.path().join("b.sock"), root.path().join("link")).unwrap();
    restrict_sockets(root.path()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root.path().join("a.sock")), 0o600);
    assert_eq!(mode(&outside.path().join("b.sock")), 0o777);
}

#[test]
fn state_json_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    persist_state(dir.path(), &[std::process::id()], None).unwrap();
    let meta = std::fs::metadata(dir.path().join("state.json")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o077, 0);
}

pub(super) fn test_options() -> VmOptions {
    VmOptions {
        backend: Backend::Qemu,
        hypervisors: Default::default(),
        binaries: Binaries {
            cloud_hypervisor: "ch".into(),
            qemu: "q".into(),
            vhost_device_vsock: "v".into(),
            virtiofsd: "f".into(),
        },
        kernel: "k".into(),
        initramfs: "i".into(),
        vcpus: 1,
        memory_mib: 256,
        max: None,
        extra_kernel_params: vec!["foo=1".into()],
        hostname: None,
        debug: false,
        console_log_max_bytes: clh_hypervisor::console_log::DEFAULT_MAX_BYTES,
        free_page_reporting: true,
        tcg_tb_size_mib: 0,
        templates: None,
        vmm_start_timeout: Duration::from_secs(1),
        agent_timeout: Duration::from_secs(1),
        agent_call_timeout: Duration::from_secs(1),
        stop_timeout: Duration::from_secs(1),
        health: super::HealthCheck {
            interval: Duration::from_millis(100),
            deadline: Duration::from_millis(500),
        },
        cgroups_path: None,
        netns: None,
    }
}

/// Empty stand-ins for the kernel and initramfs in `dir`: a fake VMM
/// never reads them, but the start refuses a missing one.
pub(crate) fn guest_image(dir: &Path) -> (PathBuf, PathBuf) {
    let (kernel, initramfs) = (dir.join("vmlinux"), dir.join("initramfs"));
    std::fs::write(&kernel, b"").unwrap();
    std::fs::write(&initramfs, b"").unwrap();
    (kernel, initramfs)
}

#[test]
fn the_command_line_carries_no_seed_only_the_extras() {
    let opts = test_options();
    assert_ne!(random_seed().unwrap(), random_seed().unwrap());
    assert_eq!(kernel_cmdline(&opts), "console=ttyS0 panic=-1 quiet foo=1");
}
