//! `containerd-shim-clh-v2 check`: can this host run pods, and if not, what
//! to install or set.

use std::io::Read;
use std::path::Path;

use clh_config::{Config, Source};
use clh_hypervisor::Backend;

use crate::host::{self, CgroupVersion, KvmFlavour};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    /// Fatal for the selected backend.
    Fail,
    /// Missing, but only the other backend needs it.
    Info,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub item: String,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug)]
pub struct Report {
    pub source: String,
    pub backend: Backend,
    pub backend_reason: String,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn can_run(&self) -> bool {
        !self.findings.iter().any(|f| f.level == Level::Fail)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "clh-shim host check (configuration: {})", self.source)?;
        for finding in &self.findings {
            let tag = match finding.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
                Level::Info => "info",
            };
            writeln!(f, "  [{tag}] {}: {}", finding.item, finding.detail)?;
            if let Some(fix) = &finding.fix {
                writeln!(f, "         fix: {fix}")?;
            }
        }
        let name = backend_name(self.backend);
        writeln!(f, "backend: {name} ({})", self.backend_reason)?;
        if self.can_run() {
            write!(f, "result: this host can run pods with the {name} backend")
        } else {
            write!(
                f,
                "result: this host cannot run pods with the {name} backend; see FAIL lines above"
            )
        }
    }
}

pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::CloudHypervisor => "cloud-hypervisor",
        Backend::Qemu => "qemu",
    }
}

fn finding(level: Level, item: &str, detail: impl Into<String>, fix: Option<String>) -> Finding {
    Finding {
        level,
        item: item.to_string(),
        detail: detail.into(),
        fix,
    }
}

/// Probes the host against `config`.
pub async fn check(config: &Config, source: &Source) -> Report {
    let kvm = KvmFlavour::detect();
    let (backend, backend_reason) = host::select_backend(config, &kvm);
    let needed = |b: Backend| {
        if b == backend {
            Level::Fail
        } else {
            Level::Info
        }
    };
    let mut findings = vec![kvm_finding(&kvm, backend)];

    let h = &config.hypervisor;
    let binaries = [
        ("cloud-hypervisor", &h.cloud_hypervisor, needed(Backend::CloudHypervisor), "hypervisor.cloud_hypervisor",
         "build or download Cloud Hypervisor (https://github.com/cloud-hypervisor/cloud-hypervisor/releases) and put it on PATH"),
        ("qemu", &h.qemu, needed(Backend::Qemu), "hypervisor.qemu", "apt-get install qemu-system-x86"),
        ("vhost-device-vsock", &h.vhost_device_vsock, needed(Backend::Qemu), "hypervisor.vhost_device_vsock",
         "cargo install --locked --root /usr/local vhost-device-vsock"),
        ("virtiofsd", &h.virtiofsd, Level::Fail, "hypervisor.virtiofsd",
         "apt-get install virtiofsd, or cargo install --locked --root /usr/local virtiofsd"),
    ];
    for (item, configured, missing_level, key, install) in binaries {
        findings.push(match host::resolve_binary(configured) {
            Some(path) => {
                let version = host::binary_version(&path)
                    .await
                    .unwrap_or_else(|| "version unknown".into());
                finding(
                    Level::Ok,
                    item,
                    format!("{} ({version})", path.display()),
                    None,
                )
            }
            None => finding(
                missing_level,
                item,
                format!("{} not found", configured.display()),
                Some(format!("{install}, or set `{key}` to its absolute path")),
            ),
        });
    }

    let g = &config.guest;
    findings.push(image_finding(
        "guest kernel (vmlinux, for cloud-hypervisor)",
        &g.kernel,
        ImageKind::Elf,
        needed(Backend::CloudHypervisor),
        "guest.kernel",
    ));
    findings.push(image_finding(
        "guest kernel (bzImage, for qemu)",
        &g.kernel_bzimage,
        ImageKind::BzImage,
        needed(Backend::Qemu),
        "guest.kernel_bzimage",
    ));
    findings.push(image_finding(
        "guest initramfs",
        &g.initramfs,
        ImageKind::Any,
        Level::Fail,
        "guest.initramfs",
    ));

    findings.extend(network_findings(Path::new(TUN_DEVICE), |name| {
        host::resolve_binary(Path::new(name))
    }));

    findings.push(match CgroupVersion::detect() {
        Some(v) => finding(Level::Ok, "cgroups", v.to_string(), None),
        None => finding(
            Level::Warn,
            "cgroups",
            "no cgroup filesystem at /sys/fs/cgroup",
            Some("mount the cgroup hierarchy; pod overhead cannot be accounted without it".into()),
        ),
    });

    Report {
        source: source.to_string(),
        backend,
        backend_reason,
        findings,
    }
}

/// The device the pods' taps are made through.
const TUN_DEVICE: &str = "/dev/net/tun";

/// What pod networking needs: the tun device (every pod with a network
/// gets taps), and for `kubectl port-forward` iptables and nsenter (the
/// loopback redirect in the pod's namespace).
fn network_findings(tun: &Path, find: impl Fn(&str) -> Option<std::path::PathBuf>) -> Vec<Finding> {
    let mut findings = vec![if tun.exists() {
        finding(
            Level::Ok,
            "pod networking",
            format!("{} present", tun.display()),
            None,
        )
    } else {
        finding(
            Level::Fail,
            "pod networking",
            format!(
                "{} missing: pods with a network cannot start",
                tun.display()
            ),
            Some("load the tun module (modprobe tun)".into()),
        )
    }];
    for (binary, package) in [("iptables", "iptables"), ("nsenter", "util-linux")] {
        findings.push(match find(binary) {
            Some(path) => finding(Level::Ok, binary, path.display().to_string(), None),
            None => finding(
                Level::Warn,
                binary,
                "not found: kubectl port-forward to pods will not work",
                Some(format!("apt-get install {package}")),
            ),
        });
    }
    findings
}

fn kvm_finding(kvm: &KvmFlavour, backend: Backend) -> Finding {
    let item = "KVM";
    match (kvm, backend) {
        (KvmFlavour::Hardware(_), _) => finding(Level::Ok, item, kvm.to_string(), None),
        (KvmFlavour::Pvm, Backend::CloudHypervisor) => finding(Level::Warn, item, kvm.to_string(),
            Some("Cloud Hypervisor on PVM boots only a PVM-enabled guest kernel: set `guest.kernel` to one, or use backend = \"qemu\"".into())),
        (_, Backend::CloudHypervisor) => finding(Level::Fail, item, kvm.to_string(),
            Some("enable VT-x/AMD-V (or nested virtualization) and load kvm_intel or kvm_amd, or use backend = \"qemu\"".into())),
        (_, Backend::Qemu) => finding(Level::Ok, item,
            format!("{kvm}; QEMU runs the guest under TCG (software emulation, slower)"), None),
    }
}

#[derive(Clone, Copy)]
enum ImageKind {
    Elf,
    BzImage,
    Any,
}

fn image_finding(
    item: &str,
    path: &Path,
    kind: ImageKind,
    missing_level: Level,
    key: &str,
) -> Finding {
    let fix = Some(format!(
        "run `make guest-image && make install` from the clh-shim source tree, or set `{key}` to your own image"
    ));
    let mut header = [0u8; 0x206];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut header));
    let n = match read {
        Ok(n) => n,
        Err(e) => return finding(missing_level, item, format!("{}: {e}", path.display()), fix),
    };
    let well_formed = match kind {
        ImageKind::Elf => n >= 4 && header[..4] == *b"\x7fELF",
        // The Linux x86 boot protocol's "HdrS" signature at 0x202.
        ImageKind::BzImage => n >= 0x206 && header[0x202..0x206] == *b"HdrS",
        ImageKind::Any => n > 0,
    };
    let expected = match kind {
        ImageKind::Elf => "an ELF vmlinux",
        ImageKind::BzImage => "a bzImage",
        ImageKind::Any => "a non-empty file",
    };
    if well_formed {
        finding(Level::Ok, item, path.display().to_string(), None)
    } else {
        finding(
            missing_level,
            item,
            format!("{} is not {expected}", path.display()),
            fix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networking_needs_the_tun_device_and_port_forward_iptables() {
        let dir = tempfile::tempdir().unwrap();
        let tun = dir.path().join("tun");
        let none = |_: &str| None;
        let missing = network_findings(&tun, none);
        assert_eq!(missing[0].level, Level::Fail);
        assert!(missing[0].fix.as_deref().unwrap().contains("modprobe tun"));
        assert!(missing[1..].iter().all(|f| f.level == Level::Warn));
        assert!(
            missing[1].detail.contains("port-forward"),
            "{:?}",
            missing[1]
        );
        std::fs::write(&tun, b"").unwrap();
        let all = |name: &str| Some(std::path::PathBuf::from(format!("/usr/sbin/{name}")));
        assert!(network_findings(&tun, all)
            .iter()
            .all(|f| f.level == Level::Ok));
    }

    #[test]
    fn image_checks_recognise_formats_and_name_the_key_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF rest").unwrap();
        assert_eq!(
            image_finding("k", &elf, ImageKind::Elf, Level::Fail, "guest.kernel").level,
            Level::Ok
        );
        let bad = image_finding(
            "k",
            &elf,
            ImageKind::BzImage,
            Level::Fail,
            "guest.kernel_bzimage",
        );
        assert_eq!(bad.level, Level::Fail);
        assert!(bad.fix.unwrap().contains("guest.kernel_bzimage"));
        let missing = image_finding(
            "k",
            &dir.path().join("nope"),
            ImageKind::Any,
            Level::Info,
            "guest.initramfs",
        );
        assert_eq!(missing.level, Level::Info);
    }

    #[tokio::test]
    async fn a_missing_binary_of_the_selected_backend_fails_the_check() {
        let mut config = Config::default();
        config.hypervisor.backend = clh_config::BackendChoice::Qemu;
        config.hypervisor.qemu = "/nonexistent/qemu-system-x86_64".into();
        let report = check(&config, &Source::BuiltInDefaults).await;
        assert!(!report.can_run());
        let text = report.to_string();
        assert!(
            text.contains("[FAIL] qemu: /nonexistent/qemu-system-x86_64 not found"),
            "{text}"
        );
        assert!(text.contains("apt-get install qemu-system-x86"), "{text}");
    }
}
