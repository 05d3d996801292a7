//! The `vm.create` body for a [`VmSpec`].

use std::path::Path;

use super::api::{
    BalloonConfig, ConsoleConfig, CpusConfig, FsConfig, HotplugMethod, MemoryConfig, NetConfig,
    PayloadConfig, VmConfig, VsockConfig,
};
use super::resize::hotplug_size_bytes;
use crate::{Nic, VmSpec};

/// The guest's vsock context id. Each VM has its own hybrid-vsock socket, so
/// every guest can use the first cid that is not reserved (0-2 are).
pub const GUEST_CID: u64 = 3;

/// The configuration that boots `spec`, with its hybrid vsock at
/// `vsock_socket`. With a `spec.max`, the VM gets room to grow to it:
/// `max_vcpus` and ACPI memory hot-plug (see [`super::resize`] for why ACPI).
/// One virtio-net device per NIC, on its tap (see [`net_config`]). With
/// `spec.free_page_reporting`, a balloon that only reports free pages.
pub fn vm_config(spec: &VmSpec, vsock_socket: &Path) -> VmConfig {
    let max_vcpus = spec.max.map_or(spec.vcpus, |max| max.vcpus.max(spec.vcpus));
    let hotplug_size = spec
        .max
        .and_then(|max| hotplug_size_bytes(spec.memory_mib, max.memory_mib));
    VmConfig {
        cpus: Some(CpusConfig {
            boot_vcpus: spec.vcpus,
            max_vcpus,
        }),
        memory: Some(MemoryConfig {
            size: u64::from(spec.memory_mib) << 20,
            // vhost-user backends (virtiofsd) map guest RAM, which works
            // only if CH maps it MAP_SHARED.
            shared: Some(true),
            hugepages: None,
            hotplug_size,
            hotplug_method: hotplug_size.map(|_| HotplugMethod::Acpi),
        }),
        payload: PayloadConfig {
            firmware: None,
            kernel: Some(spec.kernel.clone()),
            cmdline: Some(spec.cmdline.clone()),
            initramfs: Some(spec.initramfs.clone()),
        },
        fs: spec
            .shared_fs
            .as_ref()
            .map(|fs| vec![FsConfig::new(fs.tag.clone(), fs.socket.clone())]),
        net: (!spec.nics.is_empty()).then(|| spec.nics.iter().map(net_config).collect()),
        vsock: Some(vsock_config(vsock_socket)),
        // The guest kernel logs to ttyS0 (the serial port); the virtio
        // console would default to CH's own tty, which a shim does not have.
        // Into the FIFO whose reader caps the log (crate::console_log).
        serial: Some(ConsoleConfig::file(crate::console_log::pipe_path(
            &spec.dir,
        ))),
        console: Some(ConsoleConfig::off()),
        // Never inflated (size 0): only the guest's reports of free pages,
        // which CH gives back to the host.
        balloon: spec.free_page_reporting.then_some(BalloonConfig {
            size: 0,
            deflate_on_oom: None,
            free_page_reporting: Some(true),
        }),
        ..VmConfig::default()
    }
}

/// The configuration of a template VM ([`super::save_template`]): `spec`'s
/// machine (vCPUs, memory and room to grow, payload, balloon) without any
/// per-pod device, no vsock, virtio-fs or NIC (its `shared_fs` and `nics`
/// are ignored), and its serial console on the relative path
/// `console.pipe`. CH saves this configuration in the snapshot and reopens
/// the console file from it at each restore, relative to its working
/// directory, which is each restored VM's own directory.
pub fn template_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        fs: None,
        net: None,
        vsock: None,
        serial: Some(ConsoleConfig::file(crate::console_log::pipe_path(
            Path::new(""),
        ))),
        ..vm_config(spec, Path::new(""))
    }
}

/// The guest's hybrid vsock device, its host end at `socket`: at boot
/// ([`vm_config`]) and hot-plugged into a restored template.
pub fn vsock_config(socket: &Path) -> VsockConfig {
    VsockConfig {
        cid: GUEST_CID,
        socket: socket.to_path_buf(),
        id: None,
    }
}

/// The virtio-net device of `nic`: its tap (which CH, running in the pod's
/// network namespace, opens by name), the guest MAC and the MTU (0: CH's
/// default). No `ip` or `mask`: CH would assign them to the tap, because
/// its "does this tap already exist" check reads `/sys/class/net`, which
/// shows the shim's namespace, not the pod's. No `host_mac` either: the tap
/// keeps its own. CH does set the tap's MTU and brings it up.
pub fn net_config(nic: &Nic) -> NetConfig {
    NetConfig {
        tap: Some(nic.tap.clone()),
        mac: Some(nic.mac.clone()),
        mtu: (nic.mtu != 0).then_some(nic.mtu),
        // One RX and one TX queue per pair.
        num_queues: Some(2 * nic.queues),
        ..NetConfig::default()
    }
}
