//! The cri bench's tables, summary and recorded figures.

use std::time::Duration;

use anyhow::Result;
use clh_tests::bench_results::{self, Figure};
use clh_tests::idle_memory::IdleMemory;

use super::{Mode, Parallel, Samples, PARALLEL_PODS, SERIAL_PODS};

/// Each step of the clh pods' VM starts (`clh_pod_start_step_seconds`), in
/// the order the shim serves them: one sample per serial pod.
pub type StartSteps = Vec<(String, Vec<Duration>)>;

/// The steps' median beside the median pod start (RunPodSandbox →
/// container RUNNING): the shim's share is every step but the guest's.
pub fn print_steps(mode: Mode, steps: &StartSteps, serial: &Samples) {
    const GUEST: &[&str] = &["guest_boot", "agent_connect"];
    println!();
    println!(
        "{} pod VM start, by step (median of {SERIAL_PODS} serial pods; network and virtiofsd run concurrently):",
        mode.label()
    );
    println!("{:<16} {:>10} {:>8}", "step", "p50 ms", "whose");
    let mut shim = Duration::ZERO;
    for (step, all) in steps {
        let p50 = percentile(all, 50.0);
        let whose = if GUEST.contains(&step.as_str()) {
            "guest"
        } else {
            "shim"
        };
        if whose == "shim" && step != "network" {
            shim += p50;
        }
        println!("{step:<16} {:>10.1} {whose:>8}", ms(p50));
    }
    let pod = percentile(serial.of(mode), 50.0);
    println!(
        "shim's share (every step but the guest's, network overlapping virtiofsd): {:.1} ms of a {:.1} ms pod start ({:.1}%)",
        ms(shim),
        ms(pod),
        100.0 * shim.as_secs_f64() / pod.as_secs_f64().max(f64::EPSILON)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of `samples` (p in 0..=100).
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

fn p50(samples: &[Duration]) -> f64 {
    ms(percentile(samples, 50.0))
}

pub fn print_starts(serial: &Samples, parallel: &Parallel) {
    println!();
    println!(
        "{:<60} {:>9} {:>9} {:>9} {:>9}",
        "pod + container start (RunPodSandbox -> RUNNING)", "p50", "p95", "min", "max"
    );
    let row = |label: String, samples: &[Duration]| {
        let p = |q| ms(percentile(samples, q));
        println!(
            "{label:<60} {:>6.0} ms {:>6.0} ms {:>6.0} ms {:>6.0} ms",
            p(50.0),
            p(95.0),
            p(0.0),
            p(100.0)
        );
    };
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    for mode in Mode::ALL {
        let samples = serial.of(mode);
        row(
            format!("{}: {} pods one at a time", mode.label(), samples.len()),
            samples,
        );
    }
    for mode in Mode::ALL {
        let samples = pp.of(mode);
        let label = format!(
            "{}: {PARALLEL_PODS} at once, per pod ({} pods)",
            mode.label(),
            samples.len()
        );
        row(label, samples);
    }
    for mode in Mode::ALL {
        let samples = b.of(mode);
        let label = format!(
            "{}: {PARALLEL_PODS} at once, batch wall ({} batches)",
            mode.label(),
            samples.len()
        );
        row(label, samples);
    }
    let ratio = |of: &Samples, a: Mode, b: Mode| p50(of.of(a)) / p50(of.of(b));
    for (a, b) in [
        (Mode::Boot, Mode::Runc),
        (Mode::Template, Mode::Runc),
        (Mode::Template, Mode::Boot),
    ] {
        println!(
            "start ratio {} / {} (p50): {:.2}x serial, {:.2}x per pod in parallel, {:.2}x batch wall",
            a.label(),
            b.label(),
            ratio(serial, a, b),
            ratio(pp, a, b),
            ratio(&parallel.batches, a, b)
        );
    }
}

/// The figures into the results directory (table, plot, trend). The clh
/// figures against runc keep their names from before templates: a boot.
pub fn record(serial: &Samples, parallel: &Parallel, memory: &[IdleMemory]) -> Result<()> {
    let s50 = |d: &[Duration]| p50(d) / 1e3;
    let s95 = |d: &[Duration]| ms(percentile(d, 95.0)) / 1e3;
    let pss = |m: &IdleMemory| m.per_pod_mib().0;
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    let (boot, template, runc) = (Mode::Boot, Mode::Template, Mode::Runc);
    let parallel_p50 = format!("pod start p50, {PARALLEL_PODS} at once");
    let figures = [
        Figure::new(
            "pod start p50, serial",
            "s",
            s50(serial.of(boot)),
            s50(serial.of(runc)),
            runc.label(),
        ),
        Figure::new(
            "pod start p95, serial",
            "s",
            s95(serial.of(boot)),
            s95(serial.of(runc)),
            runc.label(),
        ),
        Figure::new(
            &parallel_p50,
            "s",
            s50(pp.of(boot)),
            s50(pp.of(runc)),
            runc.label(),
        ),
        Figure::new(
            &format!("batch of {PARALLEL_PODS}, p50"),
            "s",
            s50(b.of(boot)),
            s50(b.of(runc)),
            runc.label(),
        ),
        Figure::new(
            "template pod start p50, serial",
            "s",
            s50(serial.of(template)),
            s50(serial.of(boot)),
            boot.label(),
        ),
        Figure::new(
            "template pod start p95, serial",
            "s",
            s95(serial.of(template)),
            s95(serial.of(boot)),
            boot.label(),
        ),
        Figure::new(
            &format!("template {parallel_p50}"),
            "s",
            s50(pp.of(template)),
            s50(pp.of(boot)),
            boot.label(),
        ),
        Figure::new(
            "idle pod host PSS",
            "MiB",
            pss(&memory[0]),
            pss(&memory[1]),
            runc.label(),
        ),
    ];
    bench_results::record("cri", &figures).map(|_| ())
}

pub fn summary(serial: &Samples, parallel: &Parallel, memory: &[IdleMemory]) -> String {
    let s = |d: &[Duration]| p50(d) / 1e3;
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    let (boot, template, runc) = (Mode::Boot, Mode::Template, Mode::Runc);
    let [clh, runc_mem] = [&memory[0], &memory[1]].map(IdleMemory::per_pod_mib);
    let configured = memory[0].guest_configured_mib().unwrap_or(0);
    format!(
        "summary (QEMU TCG, this host): pod+container start p50, clh booted / clh from a template / runc: \
         {:.2} / {:.2} / {:.2} s serially; {PARALLEL_PODS} at once {:.2} / {:.2} / {:.2} s per pod, \
         batch {:.2} / {:.2} / {:.2} s; a template start is {:.1}x faster than a boot serially; \
         idle pod host PSS clh {:.0} MiB ({:.0} MiB of it resident guest RAM of {configured} MiB, \
         {:.0} MiB the rest) vs runc {:.1} MiB",
        s(serial.of(boot)),
        s(serial.of(template)),
        s(serial.of(runc)),
        s(pp.of(boot)),
        s(pp.of(template)),
        s(pp.of(runc)),
        s(b.of(boot)),
        s(b.of(template)),
        s(b.of(runc)),
        s(serial.of(boot)) / s(serial.of(template)).max(f64::EPSILON),
        clh.0,
        clh.1,
        clh.0 - clh.1,
        runc_mem.0
    )
}
