//! `make bench` (cri): pods through the CRI, handler `clh` beside `runc`,
//! on one private containerd 2.1 with the same images, in one run.
//!
//! - start latency, three ways: clh with the pod's VM booted, clh with it
//!   restored from a template (`[runtime] templates`, switched per start
//!   by rewriting the shim config, which each shim reads when it starts),
//!   and runc. RunPodSandbox sent → ContainerStatus reports the
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
//! Rounds rotate through the three, and which goes first, so all see the
//! same host conditions. Under QEMU TCG the absolute clh figures
//! say little about hardware KVM; the ratio to runc is the figure to
//! track. No figure is printed unless every pod ran and nothing was left
//! behind; a failure still removes the pods (here, or by the Kubelet's
//! drop) and stops containerd.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, ContainerState, Kubelet, Pod};
use clh_tests::ctr;
use clh_tests::idle_memory::{print_memory, settle, IdleMemory};

mod report;
use clh_tests::pod_metrics;
use clh_tests::podmem;
use clh_tests::templates::ConfigSwitch;
use report::{print_starts, print_steps, record, summary, StartSteps};

const CLH: &str = "clh";
const RUNC: &str = "runc";

/// How a pod starts: a handler, and for clh whether from a template.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Boot,
    Template,
    Runc,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Boot, Mode::Template, Mode::Runc];

    fn handler(self) -> &'static str {
        match self {
            Mode::Runc => RUNC,
            Mode::Boot | Mode::Template => CLH,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Boot => "clh booted",
            Mode::Template => "clh from a template",
            Mode::Runc => RUNC,
        }
    }

    fn short(self) -> &'static str {
        match self {
            Mode::Boot => "clh",
            Mode::Template => "tpl",
            Mode::Runc => RUNC,
        }
    }
}

/// Rewrites the shim config for `mode` before a clh start (runc reads
/// none).
fn configure(config: &ConfigSwitch, mode: Mode) -> Result<()> {
    match mode {
        Mode::Runc => Ok(()),
        Mode::Boot | Mode::Template => config.use_templates(mode == Mode::Template),
    }
}

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
    let templates = tempfile::Builder::new()
        .prefix("clh-bench-templates-")
        .tempdir_in("/tmp")?;
    let config = ConfigSwitch::new(&s.config, templates.path())?;
    let k = Kubelet::start(&setup)?;
    // The header now, the figures only once everything has passed.
    println!("{}", header(&k)?);
    progress("containerd up, images imported");

    // Unmeasured: the first pod of each handler pays one-off costs (page
    // cache of the guest image and the binaries, snapshot preparation),
    // and the first from a template makes it.
    for mode in Mode::ALL {
        configure(&config, mode)?;
        let (pod, _) = start_pod(&k, mode.handler(), &format!("warm-{}", mode.short()))?;
        k.remove_pod(&pod)?;
    }
    progress("warm-up pods done");
    let (serial, steps) = serial_starts(&k, &config, &s.state_dir)?;
    let parallel = parallel_starts(&k, &config)?;
    configure(&config, Mode::Boot)?;
    let memory = [
        idle_memory(&k, &s, CLH).context("clh idle pods")?,
        idle_memory(&k, &s, RUNC).context("runc idle pods")?,
    ];
    k.finish()
        .context("leftovers after the bench; no figures printed")?;

    print_starts(&serial, &parallel);
    for (mode, steps) in &steps {
        print_steps(*mode, steps, &serial);
    }
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
         1 vCPU, 512 MiB VM; booted, and restored from a template) and runc; busybox sleeper, \
         loopback-only CNI\n\
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

/// Each round starts with the next mode, so that each goes first in turn.
fn order(round: usize) -> [Mode; 3] {
    let mut modes = Mode::ALL;
    modes.rotate_left(round % Mode::ALL.len());
    modes
}

/// Latency samples of each mode.
#[derive(Default)]
struct Samples([Vec<Duration>; 3]);

impl Samples {
    fn of(&self, mode: Mode) -> &[Duration] {
        &self.0[mode as usize]
    }

    fn push(&mut self, mode: Mode, took: impl IntoIterator<Item = Duration>) {
        self.0[mode as usize].extend(took);
    }
}

fn serial_starts(
    k: &Kubelet,
    config: &ConfigSwitch,
    state_dir: &Path,
) -> Result<(Samples, Vec<(Mode, StartSteps)>)> {
    let mut samples = Samples::default();
    let mut steps: Vec<(Mode, StartSteps)> = vec![
        (Mode::Boot, StartSteps::default()),
        (Mode::Template, StartSteps::default()),
    ];
    for round in 0..SERIAL_PODS {
        for mode in order(round) {
            configure(config, mode)?;
            let (pod, took) = start_pod(k, mode.handler(), &format!("s{round}-{}", mode.short()))?;
            if let Some((_, steps)) = steps.iter_mut().find(|(m, _)| *m == mode) {
                let socket = state_dir.join(&pod.id).join("metrics.sock");
                for (step, d) in pod_metrics::start_steps(&socket)? {
                    match steps.iter_mut().find(|(s, _)| *s == step) {
                        Some((_, all)) => all.push(d),
                        None => steps.push((step, vec![d])),
                    }
                }
            }
            k.remove_pod(&pod)?;
            samples.push(mode, [took]);
        }
        progress(&format!("serial round {}/{SERIAL_PODS} done", round + 1));
    }
    Ok((samples, steps))
}

/// Per-pod latencies of the parallel batches, and each batch's wall time.
struct Parallel {
    per_pod: Samples,
    batches: Samples,
}

fn parallel_starts(k: &Kubelet, config: &ConfigSwitch) -> Result<Parallel> {
    let (mut per_pod, mut batches) = (Samples::default(), Samples::default());
    for round in 0..PARALLEL_ROUNDS {
        for mode in order(round) {
            configure(config, mode)?;
            let (took, wall) = batch(k, mode, round)?;
            per_pod.push(mode, took);
            batches.push(mode, [wall]);
            progress(&format!(
                "parallel batch {} of {} done",
                round + 1,
                mode.label()
            ));
        }
    }
    Ok(Parallel { per_pod, batches })
}

/// Starts PARALLEL_PODS pods at once, then removes them (also at once);
/// every pod that started is removed even when another failed.
fn batch(k: &Kubelet, mode: Mode, round: usize) -> Result<(Vec<Duration>, Duration)> {
    let (handler, short) = (mode.handler(), mode.short());
    let started = Instant::now();
    let results: Vec<Result<(Pod, Duration)>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..PARALLEL_PODS)
            .map(|i| s.spawn(move || start_pod(k, handler, &format!("p{round}-{i}-{short}"))))
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
    ensure!(
        errors.is_empty(),
        "{} batch {round}: {errors:#?}",
        mode.label()
    );
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
