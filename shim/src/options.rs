//! From the configuration file to the options a pod VM starts with.

use std::time::Duration;

use clh_config::Config;
use clh_hypervisor::Backend;

use crate::host::{self, KvmFlavour};
use crate::sizing::{host_cpus, SizingPolicy};
use crate::vm::{HealthCheck, VmOptions};

impl VmOptions {
    /// The VM options `config` describes on a host with `kvm`, and why that
    /// backend was chosen. The kernel is the one the backend boots: the PVH
    /// ELF for Cloud Hypervisor, the bzImage for QEMU.
    pub fn from_config(config: &Config, kvm: &KvmFlavour) -> (VmOptions, String) {
        let (backend, reason) = host::select_backend(config, kvm);
        let g = &config.guest;
        let t = &config.timeouts;
        let kernel = match backend {
            Backend::CloudHypervisor => g.kernel.clone(),
            Backend::Qemu => g.kernel_bzimage.clone(),
        };
        let options = VmOptions {
            backend,
            hypervisors: Default::default(),
            binaries: host::binaries(config),
            kernel,
            initramfs: g.initramfs.clone(),
            vcpus: g.vcpus,
            memory_mib: g.memory_mib,
            // Room for growth only where the backend can use it.
            max: backend
                .can_resize()
                .then(|| SizingPolicy::from_config(g, host_cpus()).max),
            extra_kernel_params: g.kernel_params.clone(),
            hostname: None,
            debug: g.debug_console,
            console_log_max_bytes: u64::from(g.console_log_max_kib) << 10,
            free_page_reporting: g.free_page_reporting,
            tcg_tb_size_mib: config.hypervisor.qemu_tb_size_mib,
            templates: config
                .runtime
                .templates
                .then(|| config.runtime.template_dir.clone()),
            vmm_start_timeout: Duration::from_millis(t.vmm_start_ms),
            agent_timeout: Duration::from_millis(t.agent_connect_ms),
            agent_call_timeout: Duration::from_millis(t.agent_call_ms),
            stop_timeout: Duration::from_millis(t.stop_ms),
            health: HealthCheck {
                interval: Duration::from_millis(t.health_check_interval_ms),
                deadline: Duration::from_millis(t.health_check_ms),
            },
            cgroups_path: None,
            netns: None,
        };
        (options, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_boots_its_own_kernel_format() {
        let mut config = Config::default();
        config.hypervisor.backend = clh_config::BackendChoice::Qemu;
        let (qemu, _) = VmOptions::from_config(&config, &KvmFlavour::None);
        assert_eq!(qemu.kernel, config.guest.kernel_bzimage);
        config.hypervisor.backend = clh_config::BackendChoice::CloudHypervisor;
        let (ch, _) = VmOptions::from_config(&config, &KvmFlavour::Hardware("kvm_intel"));
        assert_eq!(ch.kernel, config.guest.kernel);
        // Room for growth only where the backend can resize.
        assert!(ch.max.is_some());
        assert_eq!(qemu.max, None);
        assert_eq!(
            ch.agent_timeout,
            Duration::from_millis(config.timeouts.agent_connect_ms)
        );
        assert_eq!(
            ch.agent_call_timeout,
            Duration::from_millis(config.timeouts.agent_call_ms)
        );
    }
}
