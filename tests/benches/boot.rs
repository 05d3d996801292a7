//! `make bench` (boot): how long a pod VM takes to answer, with our kernel
//! and with Debian's cloud kernel (the same agent; `make
//! guest-image-debian`), each beside the same kernel booting a trivial
//! `/init`, all measured in the same run.
//!
//! - spawn of virtiofsd and the VMM → the agent's `Check` reply
//!   (`PodVm::start`, which includes the hybrid-vsock handshake and the
//!   `Version` call, then one `Check`);
//! - bare: spawn of the same backend with the same kernel and a static
//!   `/init` that prints a line and powers off → that line on the console;
//! - the phases of each boot: VMM start, firmware, the kernel to and
//!   through the initramfs, the agent's re-exec, init and serve, the vsock
//!   connect (the shim's spans and the guest's boot marks, `boot_phases.rs`);
//! - the guest's memory in use after boot, the agent's RSS, the initramfs.
//!
//! Rounds alternate between the kernels and the boots so that all see the
//! same host conditions. The figures are ratios: under QEMU TCG absolute
//! times say little about hardware KVM.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clh_hypervisor::{qemu::Qemu, wait::wait_until, Hypervisor, VmSpec};
use clh_tests::bench_results::{self, Figure};
use clh_tests::boot_phases::{ms, Boot, Phases};
use clh_tests::{qemu_options, state_root, GuestImage};
use containerd_shim_clh_v2::vm::PodVm;

const ROUNDS: usize = 5;
const BENCH_INIT_MARKER: &str = "clh-bench-init: reached init";

/// One guest image's samples.
struct Kernel {
    name: &'static str,
    image: GuestImage,
    /// spawn -> agent Check reply.
    ours: Vec<Duration>,
    /// spawn -> the bench /init's line.
    bare: Vec<Duration>,
    phases: Vec<Phases>,
    rss_kib: Vec<u64>,
    /// MemTotal - MemAvailable at the Check: what the booted guest uses.
    used_kib: Vec<u64>,
    total_kib: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let root = state_root()?;
    let mut kernels = vec![Kernel::new("ours", GuestImage::locate()?)];
    // The Debian cloud kernel with the same agent, for the comparison
    // (make guest-image-debian).
    kernels.push(Kernel::new("Debian", GuestImage::locate_debian()?));
    let opts = qemu_options(&kernels[0].image);
    println!(
        "boot benchmark: QEMU TCG, {} vCPU, {} MiB, {ROUNDS} rounds; kernels {}",
        opts.vcpus,
        opts.memory_mib,
        kernels
            .iter()
            .map(|k| format!("{} ({})", k.name, k.image.kernel_release))
            .collect::<Vec<_>>()
            .join(" and ")
    );
    for round in 0..ROUNDS {
        for (n, k) in kernels.iter_mut().enumerate() {
            k.round(root.path(), &format!("{round}-{n}")).await?;
        }
    }
    for k in &mut kernels {
        k.print();
    }
    let [ours, debian] = [&kernels[0], &kernels[1]].map(|k| {
        let mut v = k.ours.clone();
        median(&mut v)
    });
    let [ours_bare, debian_bare] = [&kernels[0], &kernels[1]].map(|k| {
        let mut v = k.bare.clone();
        median(&mut v)
    });
    println!();
    println!(
        "our kernel against Debian's: spawn -> agent {:.2}x ({} vs {} ms), bare kernel -> /init {:.2}x",
        ours.as_secs_f64() / debian.as_secs_f64(),
        ours.as_millis(),
        debian.as_millis(),
        ours_bare.as_secs_f64() / debian_bare.as_secs_f64()
    );
    let used = |k: &Kernel| {
        let mut v = k.used_kib.clone();
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1024.0
    };
    let size = |k: &Kernel| {
        std::fs::metadata(&k.image.initramfs)
            .map(|m| m.len())
            .unwrap_or(0)
    };
    bench_results::record(
        "boot",
        &[
            Figure::new(
                "spawn to agent Check, our kernel",
                "ms",
                ms(ours),
                ms(debian),
                "Debian kernel",
            ),
            Figure::new(
                "bare kernel to /init, our kernel",
                "ms",
                ms(ours_bare),
                ms(debian_bare),
                "Debian kernel",
            ),
            Figure::new(
                "guest memory used after boot",
                "MiB",
                used(&kernels[0]),
                used(&kernels[1]),
                "Debian kernel",
            ),
            Figure::new(
                "initramfs",
                "KiB",
                size(&kernels[0]) as f64 / 1024.0,
                size(&kernels[1]) as f64 / 1024.0,
                "Debian kernel's",
            ),
            Figure::new(
                "spawn to agent Check over bare /init, our kernel",
                "ms",
                ms(ours),
                ms(ours_bare),
                "bare /init",
            ),
        ],
    )?;
    Ok(())
}

impl Kernel {
    fn new(name: &'static str, image: GuestImage) -> Kernel {
        Kernel {
            name,
            image,
            ours: Vec::new(),
            bare: Vec::new(),
            phases: Vec::new(),
            rss_kib: Vec::new(),
            used_kib: Vec::new(),
            total_kib: 0,
        }
    }

    /// One bare boot and one pod VM boot.
    async fn round(&mut self, root: &Path, tag: &str) -> anyhow::Result<()> {
        self.bare
            .push(bare_kernel_boot(&self.image, root, tag).await?);
        let opts = qemu_options(&self.image);
        let started = Instant::now();
        let vm = PodVm::start(&format!("b{tag}"), root, &opts).await?;
        let check = vm.agent().check().await;
        let elapsed = started.elapsed();
        let spans: Vec<(&str, f64, f64)> = vm
            .start_timeline()
            .spans()
            .iter()
            .map(|s| (s.step, ms(s.start), ms(s.took)))
            .collect();
        vm.stop().await?;
        let check = check?;
        self.ours.push(elapsed);
        self.rss_kib.push(check.agent_rss_kib);
        self.used_kib
            .push(check.mem_total_kib.saturating_sub(check.mem_available_kib));
        self.total_kib = check.mem_total_kib;
        let marks: Vec<(&str, f64)> = check
            .boot_marks
            .iter()
            .map(|m| (m.name.as_str(), m.at_us as f64 / 1e3))
            .collect();
        let boot = Boot {
            spans: &spans,
            check_done: ms(elapsed),
            guest_uptime: check.uptime_ms as f64,
            marks: &marks,
        };
        self.phases.push(boot.phases());
        Ok(())
    }

    fn print(&mut self) {
        let name = self.name;
        println!();
        println!("{name} kernel ({}):", self.image.kernel_release);
        println!("{:<48} {:>10} {:>10}", "", "median", "min");
        row("clh-shim: spawn -> agent Check reply", &self.ours);
        row("baseline: spawn -> trivial static /init", &self.bare);
        let (o, b) = (median(&mut self.ours), median(&mut self.bare));
        println!(
            "boot overhead of the agent path: {:.2}x the bare kernel boot (+{} ms)",
            o.as_secs_f64() / b.as_secs_f64(),
            o.saturating_sub(b).as_millis()
        );
        print_phases(&self.phases);
        self.rss_kib.sort_unstable();
        self.used_kib.sort_unstable();
        let initramfs = std::fs::metadata(&self.image.initramfs)
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "agent RSS {} KiB; guest memory used after boot {} KiB of {} KiB (MemTotal - MemAvailable, median); initramfs {} KiB",
            self.rss_kib[self.rss_kib.len() / 2],
            self.used_kib[self.used_kib.len() / 2],
            self.total_kib,
            initramfs / 1024
        );
    }
}

/// Boots the bench initramfs on the QEMU backend and times spawn → marker.
async fn bare_kernel_boot(
    image: &GuestImage,
    root: &Path,
    round: &str,
) -> anyhow::Result<Duration> {
    let opts = qemu_options(image);
    let dir = root.join(format!("base{round}"));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let console = dir.join("console.log");
    let spec = VmSpec {
        id: format!("base{round}"),
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        kernel: image.vmlinuz.clone(),
        initramfs: image.bench_initramfs.clone(),
        cmdline: "console=ttyS0 panic=-1 quiet".into(),
        console_log: console.clone(),
        start_timeout: opts.vmm_start_timeout,
        ..VmSpec::for_test(&dir)
    };
    let mut vm = Qemu::new(
        opts.binaries.qemu.clone(),
        opts.binaries.vhost_device_vsock.clone(),
    );
    let started = Instant::now();
    let booted = async {
        vm.start(&spec).await?;
        wait_until(
            "the bench /init's line on the console",
            Duration::from_secs(90),
            || async {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                text.contains(BENCH_INIT_MARKER).then_some(())
            },
        )
        .await
    }
    .await;
    let elapsed = started.elapsed();
    vm.stop(opts.stop_timeout).await?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    if let Err(e) = booted {
        bail!("baseline boot failed: {e}");
    }
    Ok(elapsed)
}

/// Each phase's median over the rounds.
fn print_phases(rounds: &[Phases]) {
    println!();
    println!("clh-shim boot, phase by phase (median of {} rounds; the guest's clock placed on the host's at Check):", rounds.len());
    let Some(first) = rounds.first() else { return };
    for (label, _) in &first.0 {
        let mut all: Vec<f64> = rounds
            .iter()
            .filter_map(|p| p.0.iter().find(|(l, _)| l == label).map(|x| x.1))
            .collect();
        all.sort_by(f64::total_cmp);
        println!("  {label:<60} {:>8.0} ms", all[all.len() / 2]);
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn row(label: &str, samples: &[Duration]) {
    let mut sorted = samples.to_vec();
    let med = median(&mut sorted);
    println!(
        "{label:<48} {:>8} ms {:>7} ms",
        med.as_millis(),
        sorted[0].as_millis()
    );
}
