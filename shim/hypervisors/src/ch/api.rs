//! Request and response bodies of the Cloud Hypervisor REST API, for the
//! parts we use. Field names and enum values follow
//! `cloud-hypervisor-v53.0-openapi.yaml` exactly; the unit tests validate the
//! JSON we send against that spec.
//!
//! Every optional field is skipped when `None`, so a request carries only what
//! we mean and CH's own defaults apply to the rest. Responses are decoded
//! leniently (unknown fields are ignored) because CH returns its full
//! internal config, which grows between releases.
//!
//! CH ignores unknown fields in requests, so a misspelled field name would be
//! dropped silently: that is why the spec validation is strict about them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `VmConfig`: the body of `vm.create`, and the `config` of `vm.info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    pub payload: PayloadConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
}

impl VmConfig {
    /// The tags of the VM's virtio-fs devices, in the order CH lists them.
    pub fn fs_tags(&self) -> Vec<&str> {
        self.fs.iter().flatten().map(|f| f.tag.as_str()).collect()
    }
}

/// `CpusConfig`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

/// `MemoryConfig`. Sizes are in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    /// Guest RAM mapped `MAP_SHARED`; vhost-user devices (virtio-fs) need it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    /// Room for memory hotplug, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<HotplugMethod>,
}

/// `MemoryConfig.hotplug_method`. The spec types it as a plain string; these
/// are the values CH accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    Acpi,
    VirtioMem,
}

/// `PayloadConfig`: what the VM boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

/// `FsConfig`: a virtio-fs device backed by a vhost-user-fs socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    pub num_queues: u32,
    pub queue_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl FsConfig {
    /// One request queue of 1024 entries: what virtiofsd serves well and what
    /// the spec documents as the defaults.
    pub fn new(tag: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            socket: socket.into(),
            num_queues: 1,
            queue_size: 1024,
            id: None,
        }
    }
}

/// `NetConfig`. Fill in what you need; the rest stays at CH's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Name of an existing (or to-be-created) tap device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `DiskConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// `O_DIRECT` on the backing file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The virtio-blk serial the guest sees (`/dev/disk/by-id/virtio-<serial>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_type: Option<ImageType>,
}

/// `ImageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    Unknown,
}

/// `RngConfig`: the host entropy source behind virtio-rng.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
}

/// `SerialConfig` and `ConsoleConfig`: we use only the fields they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    pub fn off() -> Self {
        Self {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
        }
    }

    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            mode: ConsoleMode::File,
            file: Some(path.into()),
            socket: None,
        }
    }
}

/// `ConsoleMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// `VsockConfig`: a hybrid vsock device whose host end is a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// Guest context id; the spec requires at least 3.
    pub cid: u64,
    pub socket: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `BalloonConfig`: a virtio-balloon device. `size` (bytes) is how far it
/// is inflated at boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deflate_on_oom: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// `VmResize`: the body of `vm.resize`. Memory is in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResize {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

/// `VmSnapshotConfig`: the body of `vm.snapshot`. The VM must be paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file://<dir>`: an existing directory, where CH writes
    /// `config.json`, `state.json` and `memory-ranges`.
    pub destination_url: String,
}

/// `RestoreConfig`: the body of `vm.restore`, sent to a CH that has no VM
/// yet. The VM comes back paused (we never set the spec's `resume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// `file://<dir>`: a directory written by `vm.snapshot`.
    pub source_url: String,
    /// Whether CH populates all of guest RAM (`MAP_POPULATE`) before
    /// copying the snapshot in. Always sent, so the choice is ours, not
    /// CH's default.
    pub prefault: bool,
}

/// `VmState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    /// A state newer than the spec we target (CH also has `BreakPoint`, for
    /// its gdb stub); decoded rather than failing the whole `vm.info`.
    #[serde(other)]
    Other,
}

/// `VmInfo`: the response of `vm.info`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    /// Bytes of guest RAM currently plugged in.
    pub memory_actual_size: Option<u64>,
}

/// `VmmPingResponse`: the response of `vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmmPingResponse {
    /// The crate version, e.g. `53.0.0`.
    pub version: String,
    /// `git describe` of the build, e.g. `v53.0`.
    #[serde(default)]
    pub build_version: String,
    #[serde(default)]
    pub pid: Option<i64>,
    /// Compile-time features (`kvm`, `io_uring`, ...).
    #[serde(default)]
    pub features: Vec<String>,
}

/// `PciDeviceInfo`: what a hot-plug returns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

/// `VmCounters`: device id → counter name → value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;
