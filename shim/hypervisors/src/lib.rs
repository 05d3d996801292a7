//! The hypervisor layer: one narrow [`Hypervisor`] trait and its two backends.
//!
//! - [`ch::CloudHypervisor`]: the default. One `cloud-hypervisor --api-socket`
//!   process per VM, configured and booted through its REST API.
//! - [`qemu::Qemu`]: QEMU TCG (`-M pc -accel tcg`, virtio-pci devices) for
//!   hosts without usable KVM. Its hybrid vsock is served by `vhost-device-vsock`, so the
//!   socket the shim connects to behaves exactly like Cloud Hypervisor's.
//!
//! Both give the same guarantees to the code above them: a VM that boots the
//! given kernel and initramfs, a hybrid-vsock Unix socket to reach the agent,
//! the shared directory of [`virtiofsd::Virtiofsd`] attached as virtio-fs, a
//! virtio-net device per [`Nic`], and a `stop` that leaves no process or
//! socket behind.
//!
//! # Networking
//!
//! The VMM process runs in the pod's network namespace ([`VmSpec::netns`]),
//! entered between fork and exec ([`process::NetNs`]), as Kata does; its
//! helpers (virtiofsd, vhost-device-vsock) stay in the shim's. There it opens
//! each NIC's tap by name. The taps are the shim's: it creates them in the
//! namespace (and wires them to the pod's interfaces) before
//! [`Hypervisor::start`], and they outlive [`Hypervisor::stop`]; a backend
//! never creates, configures or deletes one (Cloud Hypervisor gets no
//! `ip`/`mask`, so it leaves the tap's addresses alone; it does bring the
//! tap up and set its MTU to the NIC's). The guest agent configures
//! addresses inside the VM, matching NICs by MAC.

pub mod ch;
pub mod console_log;
mod error;
pub mod process;
pub mod qemu;
pub mod template_key;
#[doc(hidden)]
pub mod testing;
pub mod virtiofsd;
pub mod wait;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use error::{Error, Result};

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id; used in log fields and process names only.
    pub id: String,
    /// Per-VM state directory, created by the caller. Backends put their API
    /// socket, hybrid-vsock socket and logs here and nowhere else.
    pub dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// What [`Hypervisor::resize`] may grow the VM to. `None`: the VM keeps
    /// its boot size, and the backend reserves nothing for growth.
    pub max: Option<VmSize>,
    /// Kernel image: the PVH `vmlinux` ELF for Cloud Hypervisor, the
    /// `bzImage` for QEMU.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The complete kernel command line.
    pub cmdline: String,
    /// The virtio-fs device to attach at boot, if any.
    pub shared_fs: Option<SharedFs>,
    /// Where the guest console goes (a file inside `dir`). The VMM writes
    /// into a FIFO and the backend copies it here, rotating to `<file>.1`
    /// (see [`console_log`]).
    pub console_log: PathBuf,
    /// Cap of the console log and its rotated file together, in bytes.
    pub console_log_max_bytes: u64,
    /// A virtio-balloon device that only reports free pages (it never
    /// inflates): the VMM gives each page the guest reports back to the
    /// host. The guest kernel needs `CONFIG_PAGE_REPORTING`.
    pub free_page_reporting: bool,
    /// QEMU TCG only: the translated-code buffer in MiB (`tb-size`); 0
    /// leaves QEMU's default.
    pub tcg_tb_size_mib: u32,
    /// Restore the VM from this template instead of booting it: for QEMU
    /// a file ([`qemu::save_template`]), for Cloud Hypervisor a snapshot
    /// directory ([`ch::save_template`]), made from a spec with the same
    /// machine. The spec's vsock, virtio-fs and NICs are hot-plugged into
    /// the restored VM.
    pub restore_from: Option<PathBuf>,
    /// Deadline for the VMM to come up and accept the VM configuration.
    pub start_timeout: Duration,
    /// The pod's network namespace (a file such as
    /// `/var/run/netns/cni-…`): the VMM process runs in it and opens the
    /// taps of [`VmSpec::nics`] there by name; no other process of the VM
    /// does. `None`: the shim's own. A file that is not a network namespace
    /// fails [`Hypervisor::start`] with [`Error::Netns`] before anything is
    /// spawned.
    pub netns: Option<PathBuf>,
    /// The guest's NICs in order (the guest sees them as virtio-net PCI
    /// devices), each backed by a tap in [`VmSpec::netns`] that the caller
    /// created and will delete.
    pub nics: Vec<Nic>,
}

/// A guest NIC: a virtio-net device on a tap device the shim made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's name in the VM's network namespace: 1 to 15 printable
    /// ASCII characters without `/`, `:`, `,` or `=`. Best not also the
    /// name of a multi-queue tap in the shim's namespace: Cloud Hypervisor
    /// checks a tap's flags in `/sys/class/net`, which shows the shim's
    /// namespace, not the pod's.
    pub tap: String,
    /// The guest NIC's MAC ("aa:bb:cc:dd:ee:ff"): the pod interface's, so
    /// the pod's peers keep their neighbour entries.
    pub mac: String,
    /// The MTU the device offers the guest (and Cloud Hypervisor sets on
    /// the tap); 0 leaves it to the VMM's default.
    pub mtu: u32,
    /// Queue pairs: 1, or more for a tap made multi-queue (the guest's
    /// virtio-net driver uses as many as it has vCPUs).
    pub queues: u32,
}

/// Longest interface name: `IFNAMSIZ` (16) bytes with the NUL.
const MAX_IFNAME: usize = 15;
/// Most queue pairs of a NIC.
pub const MAX_QUEUES: u32 = 16;

impl Nic {
    /// Checks what the VMM is given: a tap name the kernel accepts and
    /// that cannot inject options (QEMU splits on `,`), a MAC in the
    /// `aa:bb:cc:dd:ee:ff` form, and an MTU of 0 or 68 to 65535. An
    /// [`Error::InvalidSpec`] naming the problem otherwise.
    fn check(&self) -> Result<()> {
        let tap = &self.tap;
        let tap_ok = !tap.is_empty()
            && tap.len() <= MAX_IFNAME
            && tap != "."
            && tap != ".."
            && tap
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':' | ',' | '='));
        if !tap_ok {
            return Err(Error::InvalidSpec(format!(
                "tap name {tap:?} must be 1 to {MAX_IFNAME} printable ASCII characters without '/', ':', ',' or '='"
            )));
        }
        let octets: Vec<&str> = self.mac.split(':').collect();
        let mac_ok = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(Error::InvalidSpec(format!(
                "MAC address {:?} of tap {tap} must look like aa:bb:cc:dd:ee:ff",
                self.mac
            )));
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(Error::InvalidSpec(format!(
                "tap {tap} has {} queue pairs; 1 to {MAX_QUEUES} are allowed",
                self.queues
            )));
        }
        if self.mtu != 0 && !(68..=65535).contains(&self.mtu) {
            return Err(Error::InvalidSpec(format!(
                "MTU {} of tap {tap} must be between 68 and 65535 (or 0 for the default)",
                self.mtu
            )));
        }
        Ok(())
    }
}

/// Checks every NIC of a spec ([`Nic::check`]) and that no tap backs two of
/// them (a single-queue tap can be attached only once).
pub(crate) fn check_nics(nics: &[Nic]) -> Result<()> {
    for (i, nic) in nics.iter().enumerate() {
        nic.check()?;
        if nics[..i].iter().any(|other| other.tap == nic.tap) {
            return Err(Error::InvalidSpec(format!(
                "tap {} backs more than one NIC",
                nic.tap
            )));
        }
    }
    Ok(())
}

/// A VM's compute size: vCPUs and guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl std::fmt::Display for VmSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs and {} MiB", self.vcpus, self.memory_mib)
    }
}

/// A vhost-user-fs backend (virtiofsd) socket and the tag the guest mounts.
#[derive(Debug, Clone)]
pub struct SharedFs {
    pub socket: PathBuf,
    pub tag: String,
}

/// Which backend a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    CloudHypervisor,
    Qemu,
}

impl Backend {
    /// Whether [`Hypervisor::resize`] can grow a VM of this backend, so
    /// that a [`VmSpec::max`] is worth reserving. Cloud Hypervisor
    /// hot-plugs vCPUs and memory; QEMU VMs keep their boot size.
    pub fn can_resize(self) -> bool {
        match self {
            Backend::CloudHypervisor => true,
            Backend::Qemu => false,
        }
    }

    /// The logs this backend writes in the VM directory `dir` (its VMM's
    /// and helpers' stdout and stderr), each with what it is, for quoting
    /// in an error report. They may not exist (a start that failed early).
    pub fn log_files(self, dir: &Path) -> Vec<(&'static str, PathBuf)> {
        match self {
            Backend::CloudHypervisor => ch::CloudHypervisor::log_files(dir),
            Backend::Qemu => qemu::Qemu::log_files(dir),
        }
    }
}

/// Longest Unix socket path: `sun_path` holds 108 bytes including the
/// terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// `dir/name` as the path of a socket to bind or connect to; an
/// [`Error::InvalidSpec`] naming the path if it is longer than a Unix
/// socket allows.
pub fn socket_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::InvalidSpec(format!(
            "socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket allows; \
             use a shorter VM state directory",
            path.display()
        )));
    }
    Ok(path)
}

/// Checks, before anything is created, that every socket any backend (or
/// virtiofsd, as `virtiofsd.sock`) puts in the VM directory `dir` fits in
/// a Unix socket path. An [`Error::InvalidSpec`] that says to shorten the
/// state root otherwise.
pub fn check_vm_dir(dir: &Path) -> Result<()> {
    let longest = ch::SOCKET_NAMES
        .iter()
        .chain(qemu::SOCKET_NAMES)
        .chain(&[virtiofsd::SOCKET_NAME])
        .map(|name| name.len())
        .max()
        .unwrap_or(0);
    // The separator, then the name.
    let len = dir.as_os_str().len() + 1 + longest;
    if len > MAX_SOCKET_PATH {
        return Err(Error::InvalidSpec(format!(
            "the VM directory {} is too long for Unix socket paths ({len} > {MAX_SOCKET_PATH} bytes); configure a shorter state root",
            dir.display()
        )));
    }
    Ok(())
}

/// A VM's lifecycle, as the shim needs it. Implementations own every process
/// and socket they create and release them in [`Hypervisor::stop`] and on
/// drop.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Spawns the VMM and boots the VM described by `spec`. Returns once the
    /// guest is booting; reaching the agent is the caller's job. On error,
    /// everything spawned so far has been stopped.
    ///
    /// The VMM runs in `spec.netns` and attaches the existing taps of
    /// `spec.nics`, which must stay until [`Hypervisor::stop`]; the backend
    /// neither creates nor deletes them.
    async fn start(&mut self, spec: &VmSpec) -> Result<()>;

    /// The host Unix socket of the VM's hybrid vsock device
    /// (`CONNECT <port>\n` / `OK <port>\n`).
    fn vsock_socket(&self) -> PathBuf;

    /// Waits, at most `limit`, until connecting to
    /// [`Hypervisor::vsock_socket`] cannot disturb the vsock device's
    /// start; says whether it got there (rather than running out of time).
    /// Only the QEMU backend has something to wait for.
    async fn wait_vsock_ready(&self, _limit: Duration) -> bool {
        true
    }

    /// Host pids of the processes that make up this VM (VMM and helpers), for
    /// cgroup placement and leak checks.
    fn pids(&self) -> Vec<u32>;

    /// Resolves when the VMM process has exited (crash or stop), with a
    /// description of how it ended.
    async fn wait_exit(&self) -> String;

    /// Grows the running VM towards `target` and returns the size now in
    /// effect. Never shrinks: a resource already at or above its target is
    /// left as is. A backend may round memory up to its hot-plug granularity
    /// (Cloud Hypervisor: whole 128 MiB blocks). A target beyond the `max`
    /// the VM was started with is an [`Error::InvalidSpec`] and changes
    /// nothing; a backend without hot-plug answers [`Error::Unsupported`].
    ///
    /// The guest learns of the new resources through ACPI. Linux does not
    /// online hot-added CPUs by itself (the agent must); our guest kernel
    /// onlines hot-added memory by itself (`MEMORY_HOTPLUG_DEFAULT_ONLINE`).
    async fn resize(&self, target: VmSize) -> Result<VmSize>;

    /// Stops the VM: a graceful shutdown bounded by `timeout`, then SIGKILL.
    /// Idempotent; removes the sockets it created.
    async fn stop(&mut self, timeout: Duration) -> Result<()>;
}

/// Creates a backend of the given kind with its binaries' paths.
pub fn new_backend(backend: Backend, binaries: &Binaries) -> Box<dyn Hypervisor> {
    match backend {
        Backend::CloudHypervisor => {
            Box::new(ch::CloudHypervisor::new(binaries.cloud_hypervisor.clone()))
        }
        Backend::Qemu => Box::new(qemu::Qemu::new(
            binaries.qemu.clone(),
            binaries.vhost_device_vsock.clone(),
        )),
    }
}

/// Makes each VM's [`Hypervisor`]: [`new_backend`] by default, a fake in
/// the shim's unit tests (the seam that lets the service be tested without
/// a VM).
#[derive(Clone)]
pub struct HypervisorFactory(Arc<MakeHypervisor>);

type MakeHypervisor = dyn Fn(Backend, &Binaries) -> Box<dyn Hypervisor> + Send + Sync;

impl HypervisorFactory {
    pub fn new(
        make: impl Fn(Backend, &Binaries) -> Box<dyn Hypervisor> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(make))
    }

    pub fn make(&self, backend: Backend, binaries: &Binaries) -> Box<dyn Hypervisor> {
        (self.0)(backend, binaries)
    }
}

impl Default for HypervisorFactory {
    fn default() -> Self {
        Self::new(new_backend)
    }
}

impl std::fmt::Debug for HypervisorFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HypervisorFactory")
    }
}

/// Host binaries the backends run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub cloud_hypervisor: PathBuf,
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub virtiofsd: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_dir_too_long_for_any_backends_sockets_is_refused() {
        // QEMU's vhost-vsock.sock is the longest name: 17 bytes with the
        // separator.
        let fits = PathBuf::from(format!("/{}", "d".repeat(MAX_SOCKET_PATH - 18)));
        assert!(check_vm_dir(&fits).is_ok());
        let long = PathBuf::from(format!("/{}", "d".repeat(MAX_SOCKET_PATH - 17)));
        let err = check_vm_dir(&long).unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
        assert!(err.to_string().contains("shorter state root"), "{err}");
    }

    #[test]
    fn an_overlong_socket_path_is_a_clear_error() {
        let dir = PathBuf::from(format!("/tmp/{}", "d".repeat(100)));
        let err = socket_path(&dir, "vsock.sock").unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
        assert!(
            err.to_string().contains("shorter VM state directory"),
            "{err}"
        );
        assert!(socket_path(Path::new("/run/x"), "vsock.sock").is_ok());
    }

    fn nic(tap: &str, mac: &str, mtu: u32) -> Nic {
        Nic {
            tap: tap.into(),
            mac: mac.into(),
            mtu,
            queues: 1,
        }
    }

    #[test]
    fn nics_that_a_vmm_would_misread_are_refused() {
        let good = nic("tap0_kata", "AA:bb:cc:dd:ee:01", 1500);
        assert!(check_nics(&[good.clone(), nic("t1", "aa:bb:cc:dd:ee:02", 0)]).is_ok());
        assert!(check_nics(&[]).is_ok());
        for (bad, says) in [
            (nic("", "aa:bb:cc:dd:ee:ff", 0), "tap name"),
            (nic("tap0,vhost=on", "aa:bb:cc:dd:ee:ff", 0), "tap name"),
            (nic("a-very-long-tap0", "aa:bb:cc:dd:ee:ff", 0), "tap name"),
            (nic("tap 0", "aa:bb:cc:dd:ee:ff", 0), "tap name"),
            (nic("tap0", "aa:bb:cc:dd:ee", 0), "MAC"),
            (nic("tap0", "aa:bb:cc:dd:ee:ff,x=y", 0), "MAC"),
            (nic("tap0", "aa:bb:cc:dd:ee:fg", 0), "MAC"),
            (nic("tap0", "aa:bb:cc:dd:ee:ff", 67), "MTU"),
            (nic("tap0", "aa:bb:cc:dd:ee:ff", 65536), "MTU"),
        ] {
            let err = check_nics(std::slice::from_ref(&bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{bad:?}: {err:?}");
            assert!(err.to_string().contains(says), "{bad:?}: {err}");
        }
        let err = check_nics(&[good.clone(), good]).unwrap_err();
        assert!(err.to_string().contains("more than one NIC"), "{err}");
    }

    #[test]
    fn only_cloud_hypervisor_can_resize() {
        assert!(Backend::CloudHypervisor.can_resize());
        assert!(!Backend::Qemu.can_resize());
    }

    #[test]
    fn each_backend_names_its_own_logs() {
        let dir = Path::new("/vm");
        let ch = Backend::CloudHypervisor.log_files(dir);
        assert_eq!(ch, vec![("VMM log", dir.join("vmm.log"))]);
        let qemu: Vec<PathBuf> = Backend::Qemu
            .log_files(dir)
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        assert_eq!(
            qemu,
            vec![dir.join("qemu.log"), dir.join("vhost-device-vsock.log")]
        );
    }
}
