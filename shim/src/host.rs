//! What this host offers: the KVM flavour, the cgroup version, where the
//! binaries are. Used by `check` and to resolve `backend = "auto"`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clh_config::{BackendChoice, Config};
use clh_hypervisor::{Backend, Binaries};

/// What `/dev/kvm` is backed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFlavour {
    /// VT-x or AMD-V: Cloud Hypervisor boots standard guest kernels.
    Hardware(&'static str),
    /// Pagetable-based virtual machines (`kvm_pvm`): only PVM-enabled guest
    /// kernels boot; a standard kernel crawls and its vCPU dies.
    Pvm,
    /// /dev/kvm exists but no known KVM module is loaded.
    Unknown,
    /// No /dev/kvm (or no access to it).
    None,
}

impl KvmFlavour {
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/dev/kvm"), Path::new("/sys/module"))
    }

    fn detect_in(dev: &Path, sys_module: &Path) -> Self {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .is_ok();
        if !usable {
            return KvmFlavour::None;
        }
        if sys_module.join("kvm_pvm").exists() {
            return KvmFlavour::Pvm;
        }
        for module in ["kvm_intel", "kvm_amd"] {
            if sys_module.join(module).exists() {
                return KvmFlavour::Hardware(module);
            }
        }
        KvmFlavour::Unknown
    }
}

impl std::fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmFlavour::Hardware(m) => write!(f, "hardware KVM ({m})"),
            KvmFlavour::Pvm => write!(f, "PVM (kvm_pvm, no VT-x/AMD-V)"),
            KvmFlavour::Unknown => write!(
                f,
                "KVM of unknown flavour (no kvm_intel, kvm_amd or kvm_pvm module)"
            ),
            KvmFlavour::None => write!(f, "none (/dev/kvm missing or not accessible)"),
        }
    }
}

/// The host's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    /// v1 controllers with a v2 hierarchy at /sys/fs/cgroup/unified.
    Hybrid,
    V2,
}

impl CgroupVersion {
    pub fn detect() -> Option<Self> {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
        let root = statfs("/sys/fs/cgroup").ok()?;
        if root.filesystem_type() == CGROUP2_SUPER_MAGIC {
            return Some(CgroupVersion::V2);
        }
        match statfs("/sys/fs/cgroup/unified") {
            Ok(u) if u.filesystem_type() == CGROUP2_SUPER_MAGIC => Some(CgroupVersion::Hybrid),
            _ => Some(CgroupVersion::V1),
        }
    }
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::Hybrid => "v1 (hybrid, v2 at /sys/fs/cgroup/unified)",
            CgroupVersion::V2 => "v2 (unified)",
        })
    }
}

/// Resolves a configured binary: absolute paths as they are, bare names on
/// PATH and then in ~/.cargo/bin (where `cargo install` puts virtiofsd and
/// vhost-device-vsock).
pub fn resolve_binary(configured: &Path) -> Option<PathBuf> {
    if configured.is_absolute() {
        return is_executable(configured).then(|| configured.to_path_buf());
    }
    if let Ok(found) = which::which(configured) {
        return Some(found);
    }
    let cargo_bin =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin").join(configured))?;
    is_executable(&cargo_bin).then_some(cargo_bin)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The binaries of `config`, resolved; unresolvable ones keep their
/// configured name so that spawning them fails with that name.
pub fn binaries(config: &Config) -> Binaries {
    let h = &config.hypervisor;
    let resolve = |p: &PathBuf| resolve_binary(p).unwrap_or_else(|| p.clone());
    Binaries {
        cloud_hypervisor: resolve(&h.cloud_hypervisor),
        qemu: resolve(&h.qemu),
        vhost_device_vsock: resolve(&h.vhost_device_vsock),
        virtiofsd: resolve(&h.virtiofsd),
    }
}

/// The backend to use and why.
pub fn select_backend(config: &Config, kvm: &KvmFlavour) -> (Backend, String) {
    match config.hypervisor.backend {
        BackendChoice::CloudHypervisor => {
            (Backend::CloudHypervisor, "set in the configuration".into())
        }
        BackendChoice::Qemu => (Backend::Qemu, "set in the configuration".into()),
        BackendChoice::Auto => {
            let ch = resolve_binary(&config.hypervisor.cloud_hypervisor);
            match (kvm, ch) {
                (KvmFlavour::Hardware(_), Some(_)) => (
                    Backend::CloudHypervisor,
                    format!("auto: {kvm} and cloud-hypervisor found"),
                ),
                (KvmFlavour::Hardware(_), None) => (
                    Backend::Qemu,
                    "auto: cloud-hypervisor not found, falling back to QEMU TCG".into(),
                ),
                _ => (
                    Backend::Qemu,
                    format!("auto: /dev/kvm is {kvm}, so QEMU TCG"),
                ),
            }
        }
    }
}

/// The first line `binary --version` prints, within a short deadline.
pub async fn binary_version(binary: &Path) -> Option<String> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    text.lines().next().map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_flavour_follows_the_loaded_module() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, "").unwrap();
        let modules = dir.path().join("module");
        std::fs::create_dir_all(modules.join("kvm_intel")).unwrap();
        assert_eq!(
            KvmFlavour::detect_in(&dev, &modules),
            KvmFlavour::Hardware("kvm_intel")
        );
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dev, &modules), KvmFlavour::Pvm);
        assert_eq!(
            KvmFlavour::detect_in(&dir.path().join("none"), &modules),
            KvmFlavour::None
        );
    }

    #[test]
    fn auto_picks_qemu_without_hardware_kvm() {
        let config = Config::default();
        assert_eq!(select_backend(&config, &KvmFlavour::Pvm).0, Backend::Qemu);
        assert_eq!(select_backend(&config, &KvmFlavour::None).0, Backend::Qemu);
        let mut forced = Config::default();
        forced.hypervisor.backend = BackendChoice::CloudHypervisor;
        assert_eq!(
            select_backend(&forced, &KvmFlavour::None).0,
            Backend::CloudHypervisor
        );
    }

    #[test]
    fn bare_names_resolve_on_path_and_absolute_paths_must_exist() {
        assert!(resolve_binary(Path::new("sh")).is_some());
        assert!(resolve_binary(Path::new("/nonexistent/sh")).is_none());
        assert!(resolve_binary(Path::new("no-such-binary-clh")).is_none());
    }
}
