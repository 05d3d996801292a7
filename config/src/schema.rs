//! The configuration schema, its defaults and its validation rules.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub timeouts: TimeoutsConfig,
    pub runtime: RuntimeConfig,
}

/// Which hypervisor backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// Cloud Hypervisor when /dev/kvm is hardware KVM and the binary is
    /// there, QEMU TCG otherwise.
    Auto,
    CloudHypervisor,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    pub backend: BackendChoice,
    /// Host binaries: an absolute path, or a bare name looked up on PATH.
    pub cloud_hypervisor: PathBuf,
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_device_vsock: PathBuf,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            cloud_hypervisor: "cloud-hypervisor".into(),
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// The PVH `vmlinux` ELF Cloud Hypervisor boots.
    pub kernel: PathBuf,
    /// The `bzImage` QEMU boots (the same kernel, other packaging).
    pub kernel_bzimage: PathBuf,
    /// The initramfs with the agent as /init.
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the kernel command line. `clh.*` is reserved for the shim.
    pub kernel_params: Vec<String>,
    /// Verbose guest kernel and agent logs on the console log.
    pub debug_console: bool,
}

/// Where `make install` puts the guest image.
const IMAGE_DIR: &str = "/usr/share/clh-shim";

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            kernel: format!("{IMAGE_DIR}/vmlinux").into(),
            kernel_bzimage: format!("{IMAGE_DIR}/vmlinuz").into(),
            initramfs: format!("{IMAGE_DIR}/initramfs.cpio.gz").into(),
            vcpus: 1,
            memory_mib: 512,
            kernel_params: Vec::new(),
            debug_console: false,
        }
    }
}

/// Deadlines, in milliseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// VMM (and virtiofsd) process start to API ready.
    pub vmm_start_ms: u64,
    /// VM boot to the agent's first reply. QEMU TCG needs seconds.
    pub agent_connect_ms: u64,
    /// Graceful VM shutdown before SIGKILL.
    pub stop_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            vmm_start_ms: 5_000,
            agent_connect_ms: 30_000,
            stop_ms: 3_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Per-sandbox state (sockets, logs, shared dirs) lives under here.
    pub state_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: "/run/clh-shim".into(),
        }
    }
}

/// Longest state_dir we accept: the sockets below it (`<id>/vhost-vsock.sock`
/// with a 64-character id) must fit a Unix socket path (108 bytes).
const MAX_STATE_DIR_LEN: usize = 24;

impl Config {
    /// Checks every value; on failure returns the offending key and what is
    /// wrong with it.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let g = &self.guest;
        if !(1..=255).contains(&g.vcpus) {
            return Err((
                "guest.vcpus",
                format!("must be between 1 and 255, not {}", g.vcpus),
            ));
        }
        if !(128..=1_048_576).contains(&g.memory_mib) {
            return Err((
                "guest.memory_mib",
                format!("must be between 128 and 1048576 MiB, not {}", g.memory_mib),
            ));
        }
        for p in &g.kernel_params {
            if p.is_empty() || p.chars().any(char::is_whitespace) {
                return Err((
                    "guest.kernel_params",
                    format!("entries must be single non-empty words, not {p:?}"),
                ));
            }
            if p.starts_with("clh.") {
                return Err((
                    "guest.kernel_params",
                    format!("{p:?}: the clh.* parameters are reserved for the shim"),
                ));
            }
        }
        for (key, path) in [
            ("guest.kernel", &g.kernel),
            ("guest.kernel_bzimage", &g.kernel_bzimage),
            ("guest.initramfs", &g.initramfs),
        ] {
            if !path.is_absolute() {
                return Err((
                    key,
                    format!("must be an absolute path, not {}", path.display()),
                ));
            }
        }
        let h = &self.hypervisor;
        for (key, path) in [
            ("hypervisor.cloud_hypervisor", &h.cloud_hypervisor),
            ("hypervisor.qemu", &h.qemu),
            ("hypervisor.virtiofsd", &h.virtiofsd),
            ("hypervisor.vhost_device_vsock", &h.vhost_device_vsock),
        ] {
            let bare_name = path.components().count() == 1 && !path.is_absolute();
            if path.as_os_str().is_empty() || !(path.is_absolute() || bare_name) {
                return Err((
                    key,
                    format!("must be an absolute path or a bare command name, not {path:?}"),
                ));
            }
        }
        let t = &self.timeouts;
        for (key, ms) in [
            ("timeouts.vmm_start_ms", t.vmm_start_ms),
            ("timeouts.agent_connect_ms", t.agent_connect_ms),
            ("timeouts.stop_ms", t.stop_ms),
        ] {
            if !(1..=600_000).contains(&ms) {
                return Err((key, format!("must be between 1 and 600000 ms, not {ms}")));
            }
        }
        let state_dir = &self.runtime.state_dir;
        if !state_dir.is_absolute() {
            return Err((
                "runtime.state_dir",
                format!("must be an absolute path, not {}", state_dir.display()),
            ));
        }
        if state_dir.as_os_str().len() > MAX_STATE_DIR_LEN {
            return Err((
                "runtime.state_dir",
                format!(
                    "is too long ({} bytes, at most {MAX_STATE_DIR_LEN}): Unix socket paths below it must fit 108 bytes",
                    state_dir.as_os_str().len()
                ),
            ));
        }
        Ok(())
    }
}
