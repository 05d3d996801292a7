//! `make bench` (cri): pods through the CRI, handler `clh` beside `runc`,
//! on one private containerd 2.1 with the same images, in one run.
//!
//! - start latency: RunPodSandbox sent → ContainerStatus reports the
//!   container RUNNING, for a pod with one busybox sleeper (RunPodSandbox,
//!   CreateContainer, StartContainer, then ContainerStatus). First pods one
//!   at a time, then batches started at once (each pod's latency, and the
//!   batch's wall time: first RunPodSandbox → last container RUNNING).
//!   Pods are removed between rounds, untimed.
//! - the clh pods' VM start by step (the shim's spans and the guest's
//!   boot, from each pod's metrics), beside the whole pod start.
//! - host memory per idle pod: a few pods with one sleeper each, the PSS
//!   of each pod's host processes once their sum has settled (podmem.rs:
//!   how the processes are found, why PSS). clh: shim, VMM, vhost-device-
//!   vsock, virtiofsd and its sandboxed worker, with the guest RAM they
//!   map shown apart beside its configured size; runc: shim, pause, the
//!   container.
//!
//! Rounds alternate between the handlers, and which goes first, so both
//! see the same host conditions. Under QEMU TCG the absolute clh figures
//! say little about hardware KVM; the ratio to runc is the figure to
//! track. No figure is printed unless every pod ran and nothing was left
//! behind; a failure still removes the pods (here, or by the Kubelet's
//! drop) and stops containerd.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use clh_tests::bench_results::{self, Figure};
use clh_tests::cri::{ContainerBuilder, ContainerState, Kubelet, Pod};
use clh_tests::ctr;
use clh_tests::idle_memory::{print_memory, settle, IdleMemory};
use clh_tests::pod_metrics;
use clh_tests::podmem;

const CLH: &str = "clh";
const RUNC: &str = "runc";
/// Pods per handler started one at a time.
const SERIAL_PODS: usize = 10;
/// Pods per batch started at once, and batches per handler.
const PARALLEL_PODS: usize = 5;
const PARALLEL_ROUNDS: usize = 2;
/// Idle pods per handler whose memory is measured.
const IDLE_PODS: usize = 3;
/// Several TCG boots at once on a 2-core host take far longer than one.
const AGENT_TIMEOUT_MS: u64 = 120_000;

fn main() -> Result<()> {
    progress("starting");
    let s = ctr::setup()?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let setup = ctr::cri_setup(&s, ctr::release_shim_dir()?, images, AGENT_TIMEOUT_MS)?;
    let k = Kubelet::start(&setup)?;
    // The header now, the figures only once everything has passed.
    println!("{}", header(&k)?);
    progress("containerd up, images imported");

    // Unmeasured: the first pod of each handler pays one-off costs (page
    // cache of the guest image and the binaries, snapshot preparation).
    for handler in [CLH, RUNC] {
        let (pod, _) = start_pod(&k, handler, &format!("warm-{handler}"))?;
        k.remove_pod(&pod)?;
    }
    progress("warm-up pods done");
    let (serial, steps) = serial_starts(&k, &s.state_dir)?;
    let parallel = parallel_starts(&k)?;
    let memory = [
        idle_memory(&k, &s, CLH).context("clh idle pods")?,
        idle_memory(&k, &s, RUNC).context("runc idle pods")?,
    ];
    k.finish()
        .context("leftovers after the bench; no figures printed")?;

    print_starts(&serial, &parallel);
    print_steps(&steps, &serial);
    print_memory("host memory per idle pod (PSS, mean over pods)", &memory);
    println!();
    println!("{}", summary(&serial, &parallel, &memory));
    record(&serial, &parallel, &memory)?;
    println!("cleanup: every pod removed; no shim, VM process, mount, cgroup or state left");
    Ok(())
}

/// What was measured on what: versions, sizes, host.
fn header(k: &Kubelet) -> Result<String> {
    let version = |bin: &Path| -> Result<String> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or_default().trim().to_owned())
    };
    let containerd = version(&k.containerd().version().bin_dir().join("containerd"))?;
    let qemu = version(&clh_tests::binaries().qemu)?;
    let host = nix::sys::utsname::uname().context("uname")?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "CRI benchmark: {containerd}; handlers clh (QEMU TCG: {qemu}; pods without limits: \
         1 vCPU, 512 MiB VM) and runc; busybox sleeper, loopback-only CNI\n\
         host: {cores} cores, kernel {}; {SERIAL_PODS} serial pods, \
         {PARALLEL_ROUNDS}x{PARALLEL_PODS} parallel, {IDLE_PODS} idle pods per handler",
        host.release().to_string_lossy()
    ))
}

/// A progress line on stderr, with the time since the bench began.
fn progress(what: &str) {
    static BEGAN: OnceLock<Instant> = OnceLock::new();
    let began = BEGAN.get_or_init(Instant::now);
    eprintln!("[{:>5.0} s] {what}", began.elapsed().as_secs_f64());
}

/// Runs pod `name` with one sleeper through `handler`; returns it and the
/// time from RunPodSandbox to the container seen RUNNING. A pod that
/// fails after RunPodSandbox is removed before the error is returned.
fn start_pod(k: &Kubelet, handler: &str, name: &str) -> Result<(Pod, Duration)> {
    let (pod, sent) = k
        .run_pod_as(&k.pod(name), handler)
        .with_context(|| format!("{handler} pod {name}"))?;
    let running = (|| -> Result<Duration> {
        let id = k.run_container(&pod, &ContainerBuilder::sleeper("sleeper"))?;
        // StartContainer has returned: one status call normally shows
        // RUNNING; the wait (polling, deadline) only covers a late state.
        let status = k.cri().container_status(&id)?;
        if status.state != ContainerState::ContainerRunning as i32 {
            k.cri()
                .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        }
        Ok(sent.elapsed())
    })();
    match running {
        Ok(took) => Ok((pod, took)),
        Err(e) => {
            if let Err(r) = k.remove_pod(&pod) {
                eprintln!("removing the failed pod {name}: {r:#}");
            }
            Err(e.context(format!("{handler} pod {name} ({})", pod.id)))
        }
    }
}

/// Even rounds start with clh, odd ones with runc.
fn order(round: usize) -> [&'static str; 2] {
    if round % 2 == 0 {
        [CLH, RUNC]
    } else {
        [RUNC, CLH]
    }
}

/// Latency samples of both handlers.
#[derive(Default)]
struct Samples {
    clh: Vec<Duration>,
    runc: Vec<Duration>,
}

impl Samples {
    fn of(&mut self, handler: &str) -> &mut Vec<Duration> {
        if handler == CLH {
            &mut self.clh
        } else {
            &mut self.runc
        }
    }
}

fn serial_starts(k: &Kubelet, state_dir: &Path) -> Result<(Samples, StartSteps)> {
    let mut samples = Samples::default();
    let mut steps = StartSteps::default();
    for round in 0..SERIAL_PODS {
        for handler in order(round) {
            let (pod, took) = start_pod(k, handler, &format!("s{round}-{handler}"))?;
            if handler == CLH {
                let socket = state_dir.join(&pod.id).join("metrics.sock");
                for (step, d) in pod_metrics::start_steps(&socket)? {
                    match steps.iter_mut().find(|(s, _)| *s == step) {
                        Some((_, all)) => all.push(d),
                        None => steps.push((step, vec![d])),
                    }
                }
            }
            k.remove_pod(&pod)?;
            samples.of(handler).push(took);
        }
        progress(&format!("serial round {}/{SERIAL_PODS} done", round + 1));
    }
    Ok((samples, steps))
}

/// Each step of the clh pods' VM starts (`clh_pod_start_step_seconds`), in
/// the order the shim serves them: one sample per serial pod.
type StartSteps = Vec<(String, Vec<Duration>)>;

/// The steps' median beside the median pod start (RunPodSandbox →
/// container RUNNING): the shim's share is every step but the guest's.
fn print_steps(steps: &StartSteps, serial: &Samples) {
    const GUEST: &[&str] = &["guest_boot", "agent_connect"];
    println!();
    println!("clh pod VM start, by step (median of {SERIAL_PODS} serial pods; network and virtiofsd run concurrently):");
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
    let pod = percentile(&serial.clh, 50.0);
    println!(
        "shim's share (every step but the guest's, network overlapping virtiofsd): {:.1} ms of a {:.1} ms pod start ({:.1}%)",
        ms(shim),
        ms(pod),
        100.0 * shim.as_secs_f64() / pod.as_secs_f64().max(f64::EPSILON)
    );
}

/// Per-pod latencies of the parallel batches, and each batch's wall time.
struct Parallel {
    per_pod: Samples,
    batches: Samples,
}

fn parallel_starts(k: &Kubelet) -> Result<Parallel> {
    let (mut per_pod, mut batches) = (Samples::default(), Samples::default());
    for round in 0..PARALLEL_ROUNDS {
        for handler in order(round) {
            let (took, wall) = batch(k, handler, round)?;
            per_pod.of(handler).extend(took);
            batches.of(handler).push(wall);
            progress(&format!("parallel batch {} of {handler} done", round + 1));
        }
    }
    Ok(Parallel { per_pod, batches })
}

/// Starts PARALLEL_PODS pods at once, then removes them (also at once);
/// every pod that started is removed even when another failed.
fn batch(k: &Kubelet, handler: &str, round: usize) -> Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let results: Vec<Result<(Pod, Duration)>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..PARALLEL_PODS)
            .map(|i| s.spawn(move || start_pod(k, handler, &format!("p{round}-{i}-{handler}"))))
            .collect();
        threads.into_iter().map(join).collect()
    });
    let wall = started.elapsed();
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(pod) => pods.push(pod),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    errors.extend(k.remove_pods(pods.iter().map(|(p, _)| p)));
    ensure!(errors.is_empty(), "{handler} batch {round}: {errors:#?}");
    Ok((pods.into_iter().map(|(_, took)| took).collect(), wall))
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(anyhow!("a pod thread panicked")))
}

fn idle_memory(k: &Kubelet, s: &ctr::Setup, handler: &'static str) -> Result<IdleMemory> {
    let mut pods = Vec::new();
    let measured = (|| -> Result<IdleMemory> {
        for i in 0..IDLE_PODS {
            pods.push(start_pod(k, handler, &format!("idle{i}-{handler}"))?.0);
        }
        progress(&format!(
            "{IDLE_PODS} idle {handler} pods running; settling"
        ));
        settle(handler, || {
            pods.iter()
                .map(|pod| {
                    let vm_dir = (handler == CLH).then(|| s.state_dir.join(&pod.id));
                    let shim = format!("containerd-shim-{handler}-v2");
                    podmem::pod_memory(&shim, &pod.id, &pod.cgroup, vm_dir.as_deref())
                })
                .collect()
        })
    })();
    let removed = k.remove_pods(pods.iter());
    let measured = measured.map_err(|e| match removed.is_empty() {
        true => e,
        false => e.context(format!("also, removing the idle pods: {removed:#?}")),
    })?;
    ensure!(removed.is_empty(), "removing the idle pods: {removed:#?}");
    Ok(measured)
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

fn print_starts(serial: &Samples, parallel: &Parallel) {
    println!();
    println!(
        "{:<56} {:>9} {:>9} {:>9} {:>9}",
        "pod + container start (RunPodSandbox -> RUNNING)", "p50", "p95", "min", "max"
    );
    let row = |label: String, samples: &[Duration]| {
        let p = |q| ms(percentile(samples, q));
        println!(
            "{label:<56} {:>6.0} ms {:>6.0} ms {:>6.0} ms {:>6.0} ms",
            p(50.0),
            p(95.0),
            p(0.0),
            p(100.0)
        );
    };
    for (h, samples) in [(CLH, &serial.clh), (RUNC, &serial.runc)] {
        row(
            format!("{h}: {} pods one at a time", samples.len()),
            samples,
        );
    }
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    for (h, samples) in [(CLH, &pp.clh), (RUNC, &pp.runc)] {
        let label = format!(
            "{h}: {PARALLEL_PODS} at once, per pod ({} pods)",
            samples.len()
        );
        row(label, samples);
    }
    for (h, samples) in [(CLH, &b.clh), (RUNC, &b.runc)] {
        let label = format!(
            "{h}: {PARALLEL_PODS} at once, batch wall ({} batches)",
            samples.len()
        );
        row(label, samples);
    }
    let ratio = |a: &[Duration], b: &[Duration]| ms(percentile(a, 50.0)) / ms(percentile(b, 50.0));
    println!(
        "start ratio clh/runc (p50): {:.1}x serial, {:.1}x per pod in parallel, {:.1}x batch wall",
        ratio(&serial.clh, &serial.runc),
        ratio(&pp.clh, &pp.runc),
        ratio(&b.clh, &b.runc)
    );
}

/// The figures into the results directory (table, plot, trend).
fn record(serial: &Samples, parallel: &Parallel, memory: &[IdleMemory]) -> Result<()> {
    let p50 = |d: &[Duration]| ms(percentile(d, 50.0)) / 1e3;
    let p95 = |d: &[Duration]| ms(percentile(d, 95.0)) / 1e3;
    let pss = |m: &IdleMemory| m.per_pod_mib().0;
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    let figures = [
        Figure::new(
            "pod start p50, serial",
            "s",
            p50(&serial.clh),
            p50(&serial.runc),
            RUNC,
        ),
        Figure::new(
            "pod start p95, serial",
            "s",
            p95(&serial.clh),
            p95(&serial.runc),
            RUNC,
        ),
        Figure::new(
            &format!("pod start p50, {PARALLEL_PODS} at once"),
            "s",
            p50(&pp.clh),
            p50(&pp.runc),
            RUNC,
        ),
        Figure::new(
            &format!("batch of {PARALLEL_PODS}, p50"),
            "s",
            p50(&b.clh),
            p50(&b.runc),
            RUNC,
        ),
        Figure::new(
            "idle pod host PSS",
            "MiB",
            pss(&memory[0]),
            pss(&memory[1]),
            RUNC,
        ),
    ];
    bench_results::record("cri", &figures).map(|_| ())
}

fn summary(serial: &Samples, parallel: &Parallel, memory: &[IdleMemory]) -> String {
    let s = |d: &[Duration]| ms(percentile(d, 50.0)) / 1e3;
    let (pp, b) = (&parallel.per_pod, &parallel.batches);
    let [clh, runc] = [&memory[0], &memory[1]].map(IdleMemory::per_pod_mib);
    let configured = memory[0].guest_configured_mib().unwrap_or(0);
    format!(
        "summary (QEMU TCG, this host): pod+container start p50 clh {:.2} s vs runc {:.2} s \
         serially; {PARALLEL_PODS} at once {:.2} s vs {:.2} s per pod, batch {:.2} s vs {:.2} s; \
         idle pod host PSS clh {:.0} MiB ({:.0} MiB of it resident guest RAM of {configured} MiB, \
         {:.0} MiB the rest) vs runc {:.1} MiB",
        s(&serial.clh),
        s(&serial.runc),
        s(&pp.clh),
        s(&pp.runc),
        s(&b.clh),
        s(&b.runc),
        clh.0,
        clh.1,
        clh.0 - clh.1,
        runc.0
    )
}
