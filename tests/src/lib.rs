//! Harness of the VM tests: the guest image, host binaries, short state
//! roots, and a leak check that proves a test left nothing behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clh_hypervisor::{Backend, Binaries};
use containerd_shim_clh_v2::vm::VmOptions;

/// The processes a VM is made of; one of them still running as our child
/// after a test is a leak.
const VM_PROCESS_NAMES: [&str; 4] = [
    // /proc/<pid>/comm is truncated to 15 bytes.
    "qemu-system-x86",
    "virtiofsd",
    "vhost-device-vs",
    "cloud-hyperviso",
];

/// Compiles `tests/images/<name>.c` with `gcc -static` to `out`: a helper
/// for a container image that has no libc (busybox).
pub fn build_static_helper(name: &str, out: &Path) -> anyhow::Result<()> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("images")
        .join(format!("{name}.c"));
    let status = std::process::Command::new("gcc")
        .args(["-static", "-Os", "-Wall", "-Werror", "-o"])
        .arg(out)
        .arg(&source)
        .status()
        .context("running gcc (apt-get install gcc libc6-dev)")?;
    anyhow::ensure!(status.success(), "gcc -static {} failed", source.display());
    Ok(())
}

/// The built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    /// bzImage, for QEMU.
    pub vmlinuz: PathBuf,
    /// PVH ELF, for Cloud Hypervisor.
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// An initramfs whose /init powers off at once: a guest whose agent
    /// never answers.
    pub bench_initramfs: PathBuf,
    /// `kernel_release` from the image's manifest.
    pub kernel_release: String,
}

impl GuestImage {
    /// `$CLH_GUEST_DIR`, else `build/guest` at the workspace root. Fails
    /// loudly if the image has not been built.
    pub fn locate() -> anyhow::Result<Self> {
        Self::locate_in("CLH_GUEST_DIR", "guest", "guest-image")
    }

    /// The test guest image, whose agent has the fault switch
    /// (`InjectFault`): `$CLH_FAULTS_GUEST_DIR`, else `build/guest-faults`.
    /// Fails loudly if it has not been built.
    pub fn locate_faults() -> anyhow::Result<Self> {
        Self::locate_in("CLH_FAULTS_GUEST_DIR", "guest-faults", "guest-image-faults")
    }

    /// The same agent with the Debian cloud kernel, for the boot bench's
    /// comparison: `$CLH_DEBIAN_GUEST_DIR`, else `build/guest-debian`.
    pub fn locate_debian() -> anyhow::Result<Self> {
        Self::locate_in("CLH_DEBIAN_GUEST_DIR", "guest-debian", "guest-image-debian")
    }

    fn locate_in(variable: &str, build_dir: &str, make_target: &str) -> anyhow::Result<Self> {
        let dir = match std::env::var_os(variable) {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../build")
                .join(build_dir),
        };
        let image = Self {
            vmlinuz: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio.gz"),
            bench_initramfs: dir.join("bench-initramfs.cpio.gz"),
            kernel_release: manifest_value(&dir.join("manifest.txt"), "kernel_release")
                .unwrap_or_default(),
            dir,
        };
        for file in [&image.vmlinuz, &image.initramfs, &image.bench_initramfs] {
            if !file.is_file() {
                bail!(
                    "guest image file {} is missing: run `make {make_target}` first (or set {variable})",
                    file.display()
                );
            }
        }
        Ok(image)
    }
}

fn manifest_value(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// `name` on PATH, else in ~/.cargo/bin; the bare name if neither has it
/// (spawning it then fails with an error naming it).
pub fn find_binary(name: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path_dirs)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

pub fn binaries() -> Binaries {
    Binaries {
        cloud_hypervisor: find_binary("cloud-hypervisor"),
        qemu: find_binary("qemu-system-x86_64"),
        vhost_device_vsock: find_binary("vhost-device-vsock"),
        virtiofsd: find_binary("virtiofsd"),
    }
}

/// VM options for the QEMU backend with deadlines generous enough for TCG
/// on a loaded 2-core host.
pub fn qemu_options(image: &GuestImage) -> VmOptions {
    VmOptions {
        backend: Backend::Qemu,
        hypervisors: Default::default(),
        binaries: binaries(),
        kernel: image.vmlinuz.clone(),
        initramfs: image.initramfs.clone(),
        vcpus: 1,
        max: None,
        memory_mib: 256,
        extra_kernel_params: Vec::new(),
        hostname: None,
        debug: false,
        console_log_max_bytes: clh_hypervisor::console_log::DEFAULT_MAX_BYTES,
        free_page_reporting: true,
        tcg_tb_size_mib: clh_config::DEFAULT_QEMU_TB_SIZE_MIB,
        templates: None,
        vmm_start_timeout: Duration::from_secs(20),
        agent_timeout: Duration::from_secs(90),
        agent_call_timeout: Duration::from_secs(60),
        stop_timeout: Duration::from_secs(5),
        // TCG on a loaded host: a Check may take seconds.
        health: containerd_shim_clh_v2::vm::HealthCheck {
            interval: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        },
        cgroups_path: None,
        netns: None,
    }
}

/// A short state root under /tmp (Unix socket paths are limited to 107
/// bytes), removed on drop.
/// Stops `vm`, then fails with `result`'s error and the tail of the guest
/// console (read before the stop removes the VM's directory).
pub async fn stop_vm_and_report(
    vm: std::sync::Arc<containerd_shim_clh_v2::vm::PodVm>,
    result: anyhow::Result<()>,
) {
    let console = std::fs::read_to_string(vm.dir().join("console.log")).unwrap_or_default();
    if let Err(e) = vm.stop().await {
        panic!("stopping the VM: {e:#}");
    }
    if let Err(e) = result {
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!("{e:#}\n--- guest console (tail) ---\n{tail}");
    }
}

pub fn state_root() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("clh-t")
        .tempdir_in("/tmp")
        .context("cannot create a state root in /tmp")
}

/// Records what exists before a test and asserts afterwards that the test
/// left no VM process, mount or VM directory behind.
pub struct LeakCheck {
    root: PathBuf,
    before: BTreeSet<u32>,
}

impl LeakCheck {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            before: leaked_processes(root)
                .into_iter()
                .map(|(pid, _)| pid)
                .collect(),
        }
    }

    /// Waits (bounded) for processes to finish dying, then fails with
    /// everything that is left.
    pub async fn assert_clean(&self) {
        const DEADLINE: Duration = Duration::from_secs(10);
        let result = clh_hypervisor::wait::wait_until(
            "the test's leftovers to go away",
            DEADLINE,
            || async { self.leaks().is_empty().then_some(()) },
        )
        .await;
        if result.is_err() {
            panic!("leaks after the test:\n{}", self.leaks().join("\n"));
        }
    }

    fn leaks(&self) -> Vec<String> {
        let mut leaks: Vec<String> = leaked_processes(&self.root)
            .into_iter()
            .filter(|(pid, _)| !self.before.contains(pid))
            .map(|(pid, what)| format!("process {pid}: {what}"))
            .collect();
        let root = self.root.to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        leaks.extend(
            mountinfo
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|mount_point| mount_point.starts_with(&root))
                .map(|m| format!("mount: {m}")),
        );
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            leaks.extend(
                entries
                    .flatten()
                    .map(|e| format!("left in the state root: {}", e.path().display())),
            );
        }
        leaks
    }
}

/// Live (non-zombie) processes whose command line mentions `root`, or that
/// are VM processes and children of this test process.
fn leaked_processes(root: &Path) -> Vec<(u32, String)> {
    let me = std::process::id();
    let root = root.to_string_lossy().into_owned();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // comm may contain spaces and parentheses: fields after the last ')'.
            let (comm_part, rest) = stat.rsplit_once(')')?;
            let comm = comm_part.split_once('(')?.1;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid: u32 = fields.next()?.parse().ok()?;
            if state == "Z" || pid == me {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = ppid == me && VM_PROCESS_NAMES.contains(&comm);
            (ours || cmdline.contains(&root)).then(|| (pid, format!("{comm}: {}", cmdline.trim())))
        })
        .collect()
}
pub mod atomic_writer;
pub mod bench_results;
pub mod boot_phases;
pub mod containerd;
pub mod cri;
pub mod ctr;
pub mod faults;
pub mod fuse_frontend;
pub mod idle_memory;
pub mod kube_api;
pub mod node;
pub mod output;
pub mod pod_metrics;
pub mod podmem;
pub mod pvh;
pub mod templates;
pub mod vsock_frontend;
