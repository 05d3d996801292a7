//! `make bench`: how long a pod VM takes to answer, beside the same kernel
//! booting a trivial `/init`, measured in the same run.
//!
//! - ours: spawn of virtiofsd and the VMM → the agent's `Check` reply
//!   (`PodVm::start`, which includes the hybrid-vsock handshake and the
//!   `Version` call, then one `Check`);
//! - baseline: spawn of the same backend with the same kernel and a static
//!   `/init` that prints a line and powers off → that line on the console.
//!
//! - the phases of our boot: VMM start, firmware, the kernel to and through
//!   the initramfs, the agent's re-exec, init and serve, the vsock connect
//!   (the shim's spans and the guest's boot marks, `boot_phases.rs`).
//!
//! Rounds alternate between the two so both see the same host conditions.
//! The figure is a ratio: under QEMU TCG absolute times say little about
//! hardware KVM, but our overhead over a bare kernel boot does.

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let image = GuestImage::locate()?;
    let root = state_root()?;
    let opts = qemu_options(&image);
    println!(
        "boot benchmark: QEMU TCG, {} vCPU, {} MiB, kernel {}, {ROUNDS} rounds",
        opts.vcpus, opts.memory_mib, image.kernel_release
    );

    let (mut ours, mut baseline, mut rss_kib) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: Vec<Phases> = Vec::new();
    for round in 0..ROUNDS {
        baseline.push(bare_kernel_boot(&image, root.path(), round).await?);

        let started = Instant::now();
        let vm = PodVm::start(&format!("b{round}"), root.path(), &opts).await?;
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
        ours.push(elapsed);
        rss_kib.push(check.agent_rss_kib);
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
        phases.push(boot.phases());
    }

    let (ours_med, base_med) = (median(&mut ours), median(&mut baseline));
    println!("{:<48} {:>10} {:>10}", "", "median", "min");
    row("clh-shim: spawn -> agent Check reply", &ours);
    row("baseline: spawn -> trivial static /init", &baseline);
    println!(
        "boot overhead of the agent path: {:.2}x the bare kernel boot (+{} ms)",
        ours_med.as_secs_f64() / base_med.as_secs_f64(),
        ours_med.saturating_sub(base_med).as_millis()
    );
    print_phases(&phases);
    bench_results::record(
        "boot",
        &[Figure::new(
            "spawn to agent Check reply, median",
            "ms",
            ms(ours_med),
            ms(base_med),
            "the same kernel booting a trivial /init",
        )],
    )?;
    rss_kib.sort_unstable();
    println!(
        "agent RSS in the guest (VmRSS after boot): {} KiB median, {} KiB max",
        rss_kib[rss_kib.len() / 2],
        rss_kib[rss_kib.len() - 1]
    );
    Ok(())
}

/// Boots the bench initramfs on the QEMU backend and times spawn → marker.
async fn bare_kernel_boot(
    image: &GuestImage,
    root: &Path,
    round: usize,
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
