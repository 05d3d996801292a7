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
    /// QEMU TCG's translated-code buffer (`-accel tcg,tb-size=`), in MiB;
    /// 0: QEMU's default (1 GiB, resident as code is translated).
    pub qemu_tb_size_mib: u32,
}

/// What a QEMU TCG pod's translated code may take: about 30 MiB less
/// host memory per pod than QEMU's default, for a slower start as code is
/// translated again (docs/BENCHMARKS.md, density).
pub const DEFAULT_QEMU_TB_SIZE_MIB: u32 = 32;
/// Below this, TCG would flush and translate again all the time.
const MIN_QEMU_TB_SIZE_MIB: u32 = 8;

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            cloud_hypervisor: "cloud-hypervisor".into(),
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
            qemu_tb_size_mib: DEFAULT_QEMU_TB_SIZE_MIB,
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
    /// Size of a VM whose pod sets no CPU (resp. memory) limit.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Added to the pod's limits when it sets them: what the guest kernel,
    /// the agent and the page cache need besides the containers.
    pub overhead_vcpus: u32,
    pub overhead_memory_mib: u32,
    /// No VM is made or grown larger (vCPUs are also capped at the host's
    /// CPUs). Cloud Hypervisor reserves room to grow up to these at start.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Appended to the kernel command line. `clh.*` is reserved for the shim.
    pub kernel_params: Vec<String>,
    /// Verbose guest kernel and agent logs on the console log.
    pub debug_console: bool,
    /// Cap of a VM's console log on the host (`console.log` plus the
    /// rotated `console.log.1`), in KiB: the guest decides what it prints.
    pub console_log_max_kib: u32,
    /// A virtio-balloon device with free page reporting: memory the guest
    /// frees goes back to the host within seconds, instead of staying
    /// resident in the VMM for the pod's life.
    pub free_page_reporting: bool,
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
            overhead_vcpus: 0,
            overhead_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            kernel_params: Vec::new(),
            debug_console: false,
            console_log_max_kib: 4096,
            free_page_reporting: true,
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
    /// One request to a running agent (create a container, start a
    /// process, ...), the long polls (a process's exit) aside.
    pub agent_call_ms: u64,
    /// Graceful VM shutdown before SIGKILL.
    pub stop_ms: u64,
    /// How often a running pod's agent is health-checked (REL-AGENT-01).
    pub health_check_interval_ms: u64,
    /// How long one health check may take; an agent that does not answer
    /// within it fails the pod.
    pub health_check_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            vmm_start_ms: 5_000,
            agent_connect_ms: 30_000,
            agent_call_ms: 30_000,
            stop_ms: 3_000,
            health_check_interval_ms: 5_000,
            health_check_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Per-sandbox state (sockets, logs, shared dirs) lives under here.
    pub state_dir: PathBuf,
    /// The least severe level the shim logs (into containerd's log).
    /// containerd's own debug level (`-debug`) lowers it to `debug`.
    pub log_level: LogLevel,
    /// QEMU pods restored from a template VM instead of booted
    /// (docs/design/0004-vm-templates.md). Off: the path is incomplete
    /// (a restored guest's clock is the template's).
    pub templates: bool,
    /// Where templates are kept, one directory per template key.
    pub template_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: "/run/clh-shim".into(),
            log_level: LogLevel::Info,
            templates: false,
            template_dir: "/var/lib/clh-shim/templates".into(),
        }
    }
}

/// A log level, as containerd's `--log-level` names them (`warning` is
/// taken for `warn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    #[serde(alias = "warning")]
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level's name as `tracing` and `RUST_LOG`-style filters spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The guest's vCPU and memory keys: each in range, and the defaults and
/// overheads within the maxima.
fn validate_sizes(g: &GuestConfig) -> Result<(), (&'static str, String)> {
    let rows: [(&'static str, u32, u32, u32, &str); 7] = [
        (
            "guest.console_log_max_kib",
            g.console_log_max_kib,
            16,
            MAX_CONSOLE_LOG_KIB,
            " (KiB)",
        ),
        ("guest.max_vcpus", g.max_vcpus, 1, MAX_VCPUS, ""),
        (
            "guest.max_memory_mib",
            g.max_memory_mib,
            128,
            MAX_MEMORY_MIB,
            "",
        ),
        ("guest.vcpus", g.vcpus, 1, g.max_vcpus, " (guest.max_vcpus)"),
        (
            "guest.memory_mib",
            g.memory_mib,
            128,
            g.max_memory_mib,
            " (guest.max_memory_mib)",
        ),
        // Below the max: a pod's limit is added on top and must fit too.
        (
            "guest.overhead_vcpus",
            g.overhead_vcpus,
            0,
            g.max_vcpus.saturating_sub(1),
            " (below guest.max_vcpus, so a pod's CPU limit fits beside it)",
        ),
        // The guest kernel and the agent alone need about 100 MiB.
        (
            "guest.overhead_memory_mib",
            g.overhead_memory_mib,
            128,
            g.max_memory_mib.saturating_sub(1),
            " (at least what the guest kernel and agent need, and below \
             guest.max_memory_mib so a pod's memory limit fits beside it)",
        ),
    ];
    for (key, value, min, max, why) in rows {
        if !(min..=max).contains(&value) {
            return Err((
                key,
                format!("must be between {min} and {max}{why}, not {value}"),
            ));
        }
    }
    Ok(())
}

/// 1 GiB: a console log beyond that is a disk filler, not a log.
const MAX_CONSOLE_LOG_KIB: u32 = 1 << 20;
/// Cloud Hypervisor's limit on vCPUs (and far above any pod).
const MAX_VCPUS: u32 = 255;
/// 1 TiB.
const MAX_MEMORY_MIB: u32 = 1_048_576;

/// Longest state_dir we accept: the sockets below it (`<id>/vhost-vsock.sock`
/// with a 64-character id) must fit a Unix socket path (108 bytes).
const MAX_STATE_DIR_LEN: usize = 24;

impl Config {
    /// Checks every value; on failure returns the offending key and what is
    /// wrong with it.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let g = &self.guest;
        validate_sizes(g)?;
        let tb = self.hypervisor.qemu_tb_size_mib;
        if tb != 0 && tb < MIN_QEMU_TB_SIZE_MIB {
            return Err((
                "hypervisor.qemu_tb_size_mib",
                format!("{tb} is too small: 0 (QEMU's default) or at least {MIN_QEMU_TB_SIZE_MIB}"),
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
            ("timeouts.agent_call_ms", t.agent_call_ms),
            ("timeouts.stop_ms", t.stop_ms),
            (
                "timeouts.health_check_interval_ms",
                t.health_check_interval_ms,
            ),
            ("timeouts.health_check_ms", t.health_check_ms),
        ] {
            if !(1..=600_000).contains(&ms) {
                return Err((key, format!("must be between 1 and 600000 ms, not {ms}")));
            }
        }
        let template_dir = &self.runtime.template_dir;
        if !template_dir.is_absolute() {
            return Err((
                "runtime.template_dir",
                format!("must be an absolute path, not {}", template_dir.display()),
            ));
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
