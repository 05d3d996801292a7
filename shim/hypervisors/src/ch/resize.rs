//! Growing a Cloud Hypervisor VM: what `vm.create` reserves for it, and the
//! `vm.resize` request for a target size. Pure functions, unit-tested.
//!
//! Memory is hot-plugged the ACPI way (CH's default `hotplug_method`), not
//! with virtio-mem: the Debian cloud kernel the guest runs has ACPI memory
//! hot-plug built in (`CONFIG_ACPI_HOTPLUG_MEMORY=y`) and onlines new memory
//! blocks itself (`CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE=y`, so no udev rule
//! is needed in our initramfs), while `virtio_mem` is a module that the
//! initramfs does not carry. The price: CH plugs memory as "DIMMs" whose
//! size is a whole multiple of 128 MiB, into at most 8 slots (a ninth grow
//! fails with CH's "No ACPI slot available"), and never unplugs them.
//!
//! Measured against CH v53.0: `hotplug_size` of exactly the growth holds
//! any number of DIMMs up to it (the address gaps between DIMMs are not
//! taken from it), whether boot RAM ends below or above the 32-bit hole.

use super::api::VmResize;
use crate::{Error, Result, VmSize};

/// CH refuses an ACPI DIMM whose size is not a multiple of this.
pub const DIMM_ALIGN_MIB: u32 = 128;

/// `memory.hotplug_size` for a VM booted with `boot_mib` that may grow to
/// `max_mib`: the growth rounded up to whole DIMMs (so the last grow, rounded
/// up too, still fits). It is guest address space, not host memory: CH
/// allocates a DIMM only when it plugs it. `None` when the VM cannot grow.
pub fn hotplug_size_bytes(boot_mib: u32, max_mib: u32) -> Option<u64> {
    let growth = max_mib.checked_sub(boot_mib).filter(|&g| g > 0)?;
    Some(u64::from(round_up(growth, DIMM_ALIGN_MIB)) << 20)
}

/// The `vm.resize` body that grows `current` towards `target` within `max`,
/// and the size the VM will have once CH accepted it. `None` when nothing
/// needs to grow.
pub fn plan(current: VmSize, max: VmSize, target: VmSize) -> Result<Option<(VmResize, VmSize)>> {
    if target.vcpus > max.vcpus || target.memory_mib > max.memory_mib {
        return Err(Error::InvalidSpec(format!(
            "cannot grow the VM to {target}: it was created with room for at most {max} \
             (raise guest.max_vcpus or guest.max_memory_mib for new pods)"
        )));
    }
    let mut resize = VmResize::default();
    let mut after = current;
    if target.vcpus > current.vcpus {
        resize.desired_vcpus = Some(target.vcpus);
        after.vcpus = target.vcpus;
    }
    if target.memory_mib > current.memory_mib {
        let grow = round_up(target.memory_mib - current.memory_mib, DIMM_ALIGN_MIB);
        after.memory_mib = current.memory_mib.saturating_add(grow);
        resize.desired_ram = Some(u64::from(after.memory_mib) << 20);
    }
    Ok((after != current).then_some((resize, after)))
}

fn round_up(value: u32, align: u32) -> u32 {
    value.div_ceil(align).saturating_mul(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(vcpus: u32, memory_mib: u32) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    #[test]
    fn no_growth_room_means_no_hotplug_reservation() {
        assert_eq!(hotplug_size_bytes(512, 512), None);
        assert_eq!(hotplug_size_bytes(512, 256), None);
    }

    #[test]
    fn the_reservation_is_the_growth_in_whole_dimms() {
        // 100 MiB of growth is one 128 MiB DIMM.
        assert_eq!(hotplug_size_bytes(412, 512), Some(128 << 20));
        assert_eq!(hotplug_size_bytes(512, 2048), Some(1536 << 20));
    }

    #[test]
    fn every_grow_stays_within_the_reservation() {
        // Growth is always counted from the boot size in whole DIMMs, so
        // rounding never adds up past the rounded-up reservation.
        let boot = size(1, 500);
        let max = size(1, 1000);
        let reserved_mib = hotplug_size_bytes(500, 1000).unwrap() >> 20;
        let mut current = boot;
        for target_mib in [501, 700, 701, 999, 1000] {
            if let Some((_, after)) = plan(current, max, size(1, target_mib)).unwrap() {
                current = after;
            }
            assert!(current.memory_mib >= target_mib);
            assert!(u64::from(current.memory_mib - boot.memory_mib) <= reserved_mib);
        }
    }

    #[test]
    fn growing_memory_rounds_up_to_whole_dimms() {
        let (resize, after) = plan(size(1, 512), size(4, 2048), size(1, 600))
            .unwrap()
            .unwrap();
        assert_eq!(resize.desired_vcpus, None);
        assert_eq!(resize.desired_ram, Some(640 << 20));
        assert_eq!(after, size(1, 640));
    }

    #[test]
    fn growing_vcpus_leaves_memory_alone() {
        let (resize, after) = plan(size(1, 512), size(4, 2048), size(3, 256))
            .unwrap()
            .unwrap();
        assert_eq!((resize.desired_vcpus, resize.desired_ram), (Some(3), None));
        assert_eq!(after, size(3, 512));
    }

    #[test]
    fn nothing_to_grow_is_none() {
        assert_eq!(
            plan(size(2, 512), size(4, 2048), size(2, 512)).unwrap(),
            None
        );
        assert_eq!(
            plan(size(2, 512), size(4, 2048), size(1, 128)).unwrap(),
            None
        );
    }

    #[test]
    fn a_target_beyond_the_max_is_refused_naming_the_keys() {
        let err = plan(size(1, 512), size(2, 1024), size(3, 512)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
        assert!(text.contains("guest.max_vcpus"), "{text}");
        assert!(plan(size(1, 512), size(2, 1024), size(1, 1025)).is_err());
    }
}
