//! The QEMU and vhost-device-vsock command lines, as pure functions so the
//! exact arguments are unit-tested.

use std::ffi::OsString;
use std::path::Path;

use serde_json::{json, Value};

use crate::{check_nics, Error, Nic, Result, VmSpec};

/// The guest's vsock context id. Each VM has its own vhost-device-vsock, so
/// every guest can use the same one.
pub const GUEST_CID: u32 = 3;

/// What the QEMU backend itself needs on the kernel command line:
/// - `reboot=t` makes a guest reboot a triple fault, which `-no-reboot`
///   turns into QEMU exiting whatever reset method the machine offers;
/// - `no_timer_check`: at boot Linux checks that the IO-APIC delivers
///   timer interrupts within a few busy-waited ticks. A TCG vCPU starved
///   by a loaded host misses that window and the kernel panics (`IO-APIC +
///   timer doesn't work!`, seen with five pods booting at once on two
///   cores). The emulated timer works; the check only measures the host's
///   load. (Kata sets it for the same reason.)
const BACKEND_KERNEL_PARAMS: &str = "reboot=t no_timer_check";

/// The balloon of [`VmSpec::free_page_reporting`]: never inflated, it
/// only carries the guest's reports of free 2 MiB blocks, whose RAM QEMU
/// then discards (`fallocate(PUNCH_HOLE)` on the shared memfd, so the
/// vhost-user backends' mappings of it shrink too).
const BALLOON_DEVICE: &str = "virtio-balloon-pci,free-page-reporting=on";

/// `-accel` for TCG with a translated-code buffer of `tb_size_mib` (0:
/// QEMU's default of 1 GiB). The buffer stays resident as far as code was
/// translated: a pod's guest fills about 60 MiB of it, so a smaller one
/// is host memory saved per pod, paid in code translated again after a
/// flush (`make bench`, density).
fn tcg_accel(tb_size_mib: u32) -> String {
    match tb_size_mib {
        0 => "tcg".into(),
        mib => format!("tcg,tb-size={mib}"),
    }
}

/// Arguments of `vhost-device-vsock` serving one VM: the vhost-user socket
/// QEMU connects to, and the host-side hybrid-vsock socket (`uds`).
pub fn vhost_vsock_args(vhost_socket: &Path, uds: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--socket".into(),
        vhost_socket.into(),
        "--uds-path".into(),
        uds.into(),
    ]
}

/// Arguments of `qemu-system-x86_64` for `spec`.
///
/// - `-M pc` with virtio-pci devices, not `-M microvm`: the Debian cloud
///   kernel lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so with
///   `microvm,acpi=off` no virtio-mmio device is ever found, and with
///   microvm's ACPI no timer interrupt arrives (boot hangs after TSC
///   calibration; with `noapic` it oopses). virtio_pci is built in.
/// - `firmware`: qboot (`-bios`, Debian's qemu-system-data ships it) where
///   found, instead of SeaBIOS: under TCG SeaBIOS and its linuxboot ROM
///   take over a second of every boot, qboot a few milliseconds
///   (`make bench`, boot: the firmware phase). It loads the kernel from
///   fw_cfg and passes QEMU's ACPI tables on, so power-off still works.
/// - RAM is a shared memfd: vhost-user backends (virtiofsd,
///   vhost-device-vsock) map guest memory.
/// - `-no-reboot`: a guest reboot or panic (`panic=-1`) ends QEMU; an ACPI
///   power-off ends it too (and `console.rs` is a backstop for a halt).
/// - The serial console goes into the FIFO of [`crate::console_log`], never
///   straight into a file the guest could grow without bound.
/// - With [`VmSpec::free_page_reporting`], a virtio-balloon device that
///   only reports free pages ([`BALLOON_DEVICE`]).
/// - One virtio-net-pci device per NIC on its tap ([`nic_args`]); QEMU runs
///   in the pod's network namespace, where the taps are.
/// - No display, no default devices (so no network beyond the NICs), no
///   user config files.
pub fn qemu_args(
    spec: &VmSpec,
    vhost_vsock_socket: &Path,
    qmp_socket: &Path,
    firmware: Option<&Path>,
) -> Result<Vec<OsString>> {
    build(spec, vhost_vsock_socket, qmp_socket, firmware, Layout::Boot)
}

/// Which devices a command line has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every device of the spec: a VM booted for a pod.
    Boot,
    /// None of the per-pod devices (vsock, virtio-fs, NICs): the VM a
    /// template is saved from. vhost-user devices cannot be migrated, and
    /// a template must not carry a pod's.
    Template,
    /// [`Layout::Template`] waiting for the saved state (`-incoming
    /// defer`); the per-pod devices are hot-plugged once it runs.
    Restore,
}

/// The template's and its restores' command line ([`Layout`]): the same
/// machine, so that the saved state fits.
pub fn template_args(
    spec: &VmSpec,
    qmp_socket: &Path,
    firmware: Option<&Path>,
    layout: Layout,
) -> Result<Vec<OsString>> {
    build(spec, Path::new(""), qmp_socket, firmware, layout)
}

fn build(
    spec: &VmSpec,
    vhost_vsock_socket: &Path,
    qmp_socket: &Path,
    firmware: Option<&Path>,
    layout: Layout,
) -> Result<Vec<OsString>> {
    let per_pod = layout == Layout::Boot;
    let cmdline = format!("{} {BACKEND_KERNEL_PARAMS}", spec.cmdline.trim());
    let console_pipe = crate::console_log::pipe_path(&spec.dir);
    if cmdline.contains(['\n', '\0']) {
        return Err(Error::InvalidSpec(
            "the kernel command line contains a newline or NUL byte".into(),
        ));
    }
    let in_options = [
        Some(vhost_vsock_socket),
        Some(qmp_socket),
        Some(console_pipe.as_path()),
        spec.shared_fs.as_ref().map(|fs| fs.socket.as_path()),
    ];
    if let Some(path) = in_options
        .into_iter()
        .flatten()
        .find(|p| p.as_os_str().as_encoded_bytes().contains(&b','))
    {
        // QEMU splits option strings on commas.
        return Err(Error::InvalidSpec(format!(
            "path {} contains a comma, which QEMU would read as an option separator; use a state directory without commas",
            path.display()
        )));
    }
    check_nics(&spec.nics)?;
    if spec.vcpus == 0 || spec.memory_mib < 64 {
        return Err(Error::InvalidSpec(format!(
            "a VM needs at least 1 vCPU and 64 MiB (got {} vCPUs, {} MiB)",
            spec.vcpus, spec.memory_mib
        )));
    }
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRefOs]| {
        for item in items {
            args.push(item.os());
        }
    };
    let mem = spec.memory_mib;
    push(&[
        &"-name",
        &format!("clh-{}", spec.id),
        &"-M",
        &"pc,memory-backend=mem",
        &"-accel",
        &tcg_accel(spec.tcg_tb_size_mib),
        &"-cpu",
        &"max",
        &"-smp",
        &spec.vcpus.to_string(),
        &"-m",
        &format!("{mem}M"),
        &"-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        &"-nodefaults",
        &"-no-user-config",
        &"-nographic",
        &"-no-reboot",
    ]);
    if let Some(bios) = firmware {
        push(&[&"-bios", &bios.as_os_str()]);
    }
    push(&[
        &"-kernel",
        &spec.kernel.as_os_str(),
        &"-initrd",
        &spec.initramfs.as_os_str(),
        &"-append",
        &cmdline,
    ]);
    if per_pod {
        push(&[
            &"-chardev",
            &chardev("vsock", vhost_vsock_socket),
            &"-device",
            &"vhost-user-vsock-pci,chardev=vsock",
        ]);
    }
    // Checked in every layout: a restore hot-plugs the same device.
    if let Some(fs) = &spec.shared_fs {
        if fs.tag.is_empty()
            || !fs
                .tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::InvalidSpec(format!(
                "virtio-fs tag {:?} must be non-empty [A-Za-z0-9_-]",
                fs.tag
            )));
        }
    }
    if let Some(fs) = spec.shared_fs.as_ref().filter(|_| per_pod) {
        push(&[
            &"-chardev",
            &chardev("virtiofs", &fs.socket),
            &"-device",
            &format!("vhost-user-fs-pci,chardev=virtiofs,tag={}", fs.tag),
        ]);
    }
    if spec.free_page_reporting {
        push(&[&"-device", &BALLOON_DEVICE]);
    }
    if per_pod {
        for (i, nic) in spec.nics.iter().enumerate() {
            for arg in nic_args(i, nic) {
                push(&[&arg]);
            }
        }
    }

    push(&[&"-serial", &file_arg("file:", &console_pipe), &"-qmp", &{
        let mut s = file_arg("unix:", qmp_socket);
        s.push(",server=on,wait=off");
        s
    }]);
    if layout == Layout::Restore {
        push(&[&"-incoming", &"defer"]);
    }
    Ok(args)
}

/// A QEMU object's properties in order, typed as QMP takes them; the
/// first is its kind (`type` of a netdev, `driver` of a device).
pub type Properties = Vec<(&'static str, Value)>;

/// The tap backend and virtio-net device of NIC number `index` (checked by
/// [`check_nics`], so nothing in it can add options): what [`nic_args`]
/// writes at boot and a restore hot-plugs over QMP (template.rs).
///
/// - `ifname`: QEMU opens the existing tap by name (it is in QEMU's
///   network namespace); `script=no,downscript=no`: it runs no helper to
///   configure or remove it; the tap is the shim's.
/// - No `vhost=on`: under TCG vhost-net gains nothing, and QEMU's default
///   is off.
/// - `host_mtu`: the MTU the device offers the guest (`VIRTIO_NET_F_MTU`);
///   left out when the NIC has none (0).
pub fn nic_properties(index: usize, nic: &Nic) -> (Properties, Properties) {
    let netdev_id = format!("net{index}");
    let mut netdev: Properties = vec![
        ("type", json!("tap")),
        ("id", json!(netdev_id)),
        ("ifname", json!(nic.tap)),
        ("script", json!("no")),
        ("downscript", json!("no")),
    ];
    let mut device: Properties = vec![
        ("driver", json!("virtio-net-pci")),
        ("netdev", json!(netdev_id)),
        ("mac", json!(nic.mac)),
    ];
    if nic.mtu != 0 {
        device.push(("host_mtu", json!(nic.mtu)));
    }
    if nic.queues > 1 {
        // A vector per queue, one for config changes, one for control.
        netdev.push(("queues", json!(nic.queues)));
        device.push(("mq", json!(true)));
        device.push(("vectors", json!(2 * nic.queues + 2)));
    }
    (netdev, device)
}

/// The `-netdev` and `-device` options of NIC number `index`
/// ([`nic_properties`]).
pub fn nic_args(index: usize, nic: &Nic) -> Vec<OsString> {
    let (netdev, device) = nic_properties(index, nic);
    vec![
        "-netdev".into(),
        option_string(&netdev).into(),
        "-device".into(),
        option_string(&device).into(),
    ]
}

/// `kind,key=value,...` as QEMU's command line takes `properties`; a
/// boolean is `on` or `off`.
fn option_string(properties: &[(&str, Value)]) -> String {
    let value = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
        other => other.to_string(),
    };
    let mut parts = properties.iter();
    let mut out = parts.next().map(|(_, v)| value(v)).unwrap_or_default();
    for (key, v) in parts {
        out.push_str(&format!(",{key}={}", value(v)));
    }
    out
}

fn chardev(id: &str, path: &Path) -> OsString {
    let mut s = OsString::from(format!("socket,id={id},path="));
    s.push(path);
    s
}

fn file_arg(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s
}

/// Lets one list mix `&str`, `String`, `&OsStr` and `OsString` arguments.
trait AsRefOs {
    fn os(&self) -> OsString;
}
impl<T: AsRef<std::ffi::OsStr> + ?Sized> AsRefOs for T {
    fn os(&self) -> OsString {
        self.as_ref().to_os_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::SharedFs;

    fn spec() -> VmSpec {
        let dir = PathBuf::from("/run/x/pod1");
        VmSpec {
            id: "pod1".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: PathBuf::from("/k/vmlinuz"),
            initramfs: PathBuf::from("/k/initramfs.cpio.gz"),
            cmdline: "console=ttyS0 quiet".into(),
            shared_fs: Some(SharedFs {
                socket: dir.join("fs.sock"),
                tag: "clh-shared".into(),
            }),
            start_timeout: Duration::from_secs(5),
            ..VmSpec::for_test(&dir)
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn qemu_command_line_is_exactly_this() {
        let args = qemu_args(
            &spec(),
            Path::new("/run/x/pod1/vv.sock"),
            Path::new("/run/x/pod1/qmp.sock"),
            Some(Path::new("/usr/share/qemu/qboot.rom")),
        )
        .unwrap();
        assert_eq!(
            joined(&args),
            "-name clh-pod1 -M pc,memory-backend=mem -accel tcg -cpu max -smp 2 -m 256M \
             -object memory-backend-memfd,id=mem,size=256M,share=on -nodefaults -no-user-config -nographic -no-reboot \
             -bios /usr/share/qemu/qboot.rom -kernel /k/vmlinuz -initrd /k/initramfs.cpio.gz -append console=ttyS0 quiet reboot=t no_timer_check \
             -chardev socket,id=vsock,path=/run/x/pod1/vv.sock -device vhost-user-vsock-pci,chardev=vsock \
             -chardev socket,id=virtiofs,path=/run/x/pod1/fs.sock -device vhost-user-fs-pci,chardev=virtiofs,tag=clh-shared \
             -serial file:/run/x/pod1/console.pipe -qmp unix:/run/x/pod1/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn a_template_and_its_restores_share_the_machine_without_per_pod_devices() {
        let qmp = Path::new("/d/qmp.sock");
        let s = VmSpec {
            free_page_reporting: true,
            ..spec()
        };
        let template = joined(&template_args(&s, qmp, None, Layout::Template).unwrap());
        let restore = joined(&template_args(&s, qmp, None, Layout::Restore).unwrap());
        assert_eq!(format!("{template} -incoming defer"), restore);
        for per_pod in ["vhost-user-vsock", "vhost-user-fs", "virtio-net"] {
            assert!(!restore.contains(per_pod), "{restore}");
        }
        assert!(restore.contains("virtio-balloon-pci"), "{restore}");
    }

    #[test]
    fn the_tcg_translation_buffer_is_sized_when_configured() {
        let paths = (Path::new("/d/vv.sock"), Path::new("/d/qmp.sock"));
        let s = VmSpec {
            tcg_tb_size_mib: 32,
            ..spec()
        };
        let args = joined(&qemu_args(&s, paths.0, paths.1, None).unwrap());
        assert!(args.contains(" -accel tcg,tb-size=32 "), "{args}");
    }

    #[test]
    fn free_page_reporting_adds_a_reporting_only_balloon() {
        let s = VmSpec {
            free_page_reporting: true,
            ..spec()
        };
        let paths = (Path::new("/d/vv.sock"), Path::new("/d/qmp.sock"));
        let with = joined(&qemu_args(&s, paths.0, paths.1, None).unwrap());
        assert!(
            with.contains(" -device virtio-balloon-pci,free-page-reporting=on "),
            "{with}"
        );
        let without = joined(&qemu_args(&spec(), paths.0, paths.1, None).unwrap());
        assert!(!without.contains("balloon"), "{without}");
    }

    #[test]
    fn each_nic_is_a_tap_netdev_and_a_virtio_net_device() {
        let s = VmSpec {
            netns: Some(PathBuf::from("/var/run/netns/cni-1")),
            nics: Nic::two_for_test(),
            ..spec()
        };
        let args = qemu_args(
            &s,
            Path::new("/run/x/pod1/vv.sock"),
            Path::new("/run/x/pod1/qmp.sock"),
            Some(Path::new("/usr/share/qemu/qboot.rom")),
        )
        .unwrap();
        let all = joined(&args);
        let nets = "-netdev tap,id=net0,ifname=tap0_clh,script=no,downscript=no \
             -device virtio-net-pci,netdev=net0,mac=0a:58:0a:f4:00:07,host_mtu=1450 \
             -netdev tap,id=net1,ifname=tap1_clh,script=no,downscript=no \
             -device virtio-net-pci,netdev=net1,mac=0a:58:0a:f4:01:07";
        // After the other devices, before the console and QMP.
        let expected = joined(
            &qemu_args(
                &spec(),
                Path::new("/run/x/pod1/vv.sock"),
                Path::new("/run/x/pod1/qmp.sock"),
                Some(Path::new("/usr/share/qemu/qboot.rom")),
            )
            .unwrap(),
        )
        .replace(" -serial ", &format!(" {nets} -serial "));
        assert_eq!(all, expected);
        assert!(!all.contains("vhost=on"), "{all}");
        assert_eq!(
            joined(&nic_args(0, &s.nics[1])),
            "-netdev tap,id=net0,ifname=tap1_clh,script=no,downscript=no \
             -device virtio-net-pci,netdev=net0,mac=0a:58:0a:f4:01:07"
        );
    }

    #[test]
    fn a_multi_queue_nic_opens_a_queue_per_pair() {
        let nic = Nic {
            tap: "tap0_clh".into(),
            mac: "0a:58:0a:f4:00:07".into(),
            mtu: 0,
            queues: 2,
        };
        assert_eq!(
            joined(&nic_args(0, &nic)),
            "-netdev tap,id=net0,ifname=tap0_clh,script=no,downscript=no,queues=2 \
             -device virtio-net-pci,netdev=net0,mac=0a:58:0a:f4:00:07,mq=on,vectors=6"
        );
        let s = VmSpec {
            nics: vec![Nic { queues: 0, ..nic }],
            ..spec()
        };
        assert!(qemu_args(&s, Path::new("/a"), Path::new("/b"), None).is_err());
    }

    #[test]
    fn a_nic_that_could_inject_options_is_refused() {
        for nic in [
            Nic {
                tap: "tap0,vhost=on".into(),
                mac: "0a:58:0a:f4:00:07".into(),
                mtu: 0,
                queues: 1,
            },
            Nic {
                tap: "tap0".into(),
                mac: "0a:58:0a:f4:00:07,bus=x".into(),
                mtu: 0,
                queues: 1,
            },
        ] {
            let s = VmSpec {
                nics: vec![nic],
                ..spec()
            };
            let err = qemu_args(&s, Path::new("/a"), Path::new("/b"), None).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
        }
    }

    #[test]
    fn a_tag_that_could_inject_device_options_is_refused() {
        let mut s = spec();
        if let Some(fs) = s.shared_fs.as_mut() {
            fs.tag = "x,chardev=evil".into();
        }
        assert!(qemu_args(&s, Path::new("/a"), Path::new("/b"), None).is_err());
    }

    #[test]
    fn a_newline_in_the_kernel_command_line_is_refused() {
        let mut s = spec();
        s.cmdline = "quiet\ninit=/bin/sh".into();
        assert!(qemu_args(&s, Path::new("/a"), Path::new("/b"), None).is_err());
    }

    #[test]
    fn vhost_vsock_arguments() {
        let args = vhost_vsock_args(Path::new("/d/vv.sock"), Path::new("/d/vsock.sock"));
        assert_eq!(
            joined(&args),
            "--guest-cid 3 --socket /d/vv.sock --uds-path /d/vsock.sock"
        );
    }
}
