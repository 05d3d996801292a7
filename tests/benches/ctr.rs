//! `make bench` (ctr): `ctr run` through the clh runtime beside runc, on the
//! same busybox image and the same private containerd 2.x, in one run.
//!
//! - start: `ctr run --rm <image> <id> true` wall time, spawn of ctr → its
//!   exit (create, start, wait, delete; for clh that includes the VM boot
//!   and stop), and for clh also with the VM restored from a template
//!   (`[runtime] templates`; docs/design/0004-vm-templates.md);
//! - stdout: a container writing 100 MiB to stdout, carried to ctr through
//!   containerd's FIFOs (for clh: pipe → agent → vsock → shim → FIFO) and
//!   counted here byte by byte; the rate is first byte → end of file, so
//!   the container's start is not in it;
//! - the in-VM ceiling of that stream: the same writer into a pipe read
//!   inside the container (`head … | dd of=/dev/null`), timed by the guest,
//!   nothing crossing to the host. No transport can deliver more than the
//!   writer makes, so it bounds what the stdout path could reach here: under
//!   TCG busybox `head -c` itself (a getc/putchar loop) is the bottleneck.
//!
//! Rounds alternate between the runtimes, and which goes first, so both
//! see the same host conditions. Under QEMU TCG the absolute clh figures
//! say little about hardware KVM; the ratio to runc is the figure to track.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::bench_results::{self, Figure};
use clh_tests::containerd::{check, ContainerdVersion, PrivateContainerd};
use clh_tests::templates::ConfigSwitch;
use clh_tests::GuestImage;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const CLH: &str = "io.containerd.clh.v2";
const RUNC: &str = "io.containerd.runc.v2";
/// Start rounds per runtime: each clh round boots a TCG VM (seconds).
/// `CLH_BENCH_START_ROUNDS` overrides it (0 skips the start figures).
const START_ROUNDS: usize = 5;
/// Stream rounds per runtime: each clh round moves 100 MiB through TCG.
/// `CLH_BENCH_STREAM_ROUNDS` overrides it (0 skips the stdout figures).
const STREAM_ROUNDS: usize = 3;
const STREAM_BYTES: u64 = 100 * 1024 * 1024;
/// One `ctr run` that takes longer than this is a hang, not a sample.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn main() -> Result<()> {
    let shim_dir = clh_tests::ctr::release_shim_dir()?;
    let image = GuestImage::locate()?;
    // Short, under /tmp: the shim's sockets live in its state dir.
    let tmp = tempfile::Builder::new().prefix("clh-").tempdir_in("/tmp")?;
    let state_dir = tmp.path().join("s");
    let config = tmp.path().join("clh-shim.toml");
    clh_tests::ctr::write_shim_config(&config, &state_dir, &image)?;
    let config = config.display().to_string();
    let mut ctd = PrivateContainerd::start_with_env(
        ContainerdVersion::V2,
        Some(&shim_dir),
        &[("CLH_SHIM_CONFIG", &config)],
    )?;
    ctd.import_image(
        &clh_tests::ctr::busybox_tar(Path::new(env!("CARGO_TARGET_TMPDIR")))?,
        BUSYBOX,
    )?;

    let version = Command::new(ctd.version().bin_dir().join("containerd"))
        .arg("--version")
        .output()?;
    let start_rounds = rounds("CLH_BENCH_START_ROUNDS", START_ROUNDS)?;
    let stream_rounds = rounds("CLH_BENCH_STREAM_ROUNDS", STREAM_ROUNDS)?;
    println!(
        "ctr benchmark: {}, busybox image, {start_rounds} start rounds, {stream_rounds} stdout rounds",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    println!(
        "clh shim: {}",
        shim_dir.join("containerd-shim-clh-v2").display()
    );

    // Unmeasured: the first run of each pays one-off costs (page cache of
    // the guest image and the shims' binaries, snapshot preparation).
    for runtime in [CLH, RUNC] {
        run_true(&ctd, runtime, &format!("warm-{}", short(runtime)))?;
    }

    // The clh start also through a template ([runtime] templates),
    // switched per run by rewriting the shim config (read at each start);
    // the first run with it makes the template, unmeasured.
    let switch = ConfigSwitch::new(Path::new(&config), &tmp.path().join("templates"))?;
    let (mut clh_start, mut runc_start, mut template_start) = (Vec::new(), Vec::new(), Vec::new());
    if start_rounds > 0 {
        switch.use_templates(true)?;
        run_true(&ctd, CLH, "warm-template")?;
        switch.use_templates(false)?;
    }
    for round in 0..start_rounds {
        for runtime in order(round) {
            let took = run_true(&ctd, runtime, &format!("s{round}-{}", short(runtime)))?;
            if runtime == CLH {
                &mut clh_start
            } else {
                &mut runc_start
            }
            .push(took);
        }
        switch.use_templates(true)?;
        template_start.push(run_true(&ctd, CLH, &format!("t{round}-clh"))?);
        switch.use_templates(false)?;
    }
    let (mut clh_rate, mut runc_rate, mut ceiling) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..stream_rounds {
        ceiling.push(in_vm_ceiling(&ctd, &format!("c{round}"))?);
        for runtime in order(round) {
            let rate = run_stream(&ctd, runtime, &format!("o{round}-{}", short(runtime)))?;
            if runtime == CLH {
                &mut clh_rate
            } else {
                &mut runc_rate
            }
            .push(rate);
        }
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    if start_rounds > 0 {
        print_start(&clh_start, &runc_start, &template_start, ms);
    }
    if stream_rounds > 0 {
        print_stream(&clh_rate, &runc_rate, &ceiling);
    }
    println!(
        "These are QEMU TCG figures (software emulation of the guest). On hardware KVM \
         the targets are < 150 ms for ctr run --rm true and >= 200 MB/s for stdout."
    );
    // --rm must have removed every container; the harness's stop would
    // otherwise delete leftovers silently.
    for what in ["tasks", "containers"] {
        let out = ctd.ctr(&[what, "ls", "-q"])?;
        check(&out, &format!("ctr {what} ls"))?;
        let left = String::from_utf8_lossy(&out.stdout);
        ensure!(left.trim().is_empty(), "{what} left after --rm: {left}");
    }
    ctd.stop()?;
    let leaks = clh_tests::ctr::leaks(&ctd, &state_dir);
    ensure!(leaks.is_empty(), "left behind: {leaks:#?}");

    println!("cleanup: containerd stopped, no shim, VM process, mount or state left");
    let mut figures = Vec::new();
    if start_rounds > 0 {
        figures.push(Figure::new(
            "ctr run --rm true, median",
            "ms",
            ms(median(&clh_start)),
            ms(median(&runc_start)),
            RUNC,
        ));
        figures.push(Figure::new(
            "ctr run --rm true, template restore, median",
            "ms",
            ms(median(&template_start)),
            ms(median(&clh_start)),
            "clh cold boot",
        ));
    }
    if stream_rounds > 0 {
        figures.push(Figure::new(
            "100 MiB stdout, median",
            "MB/s",
            median(&clh_rate),
            median(&runc_rate),
            RUNC,
        ));
        figures.push(Figure::new(
            "100 MiB stdout, in-VM ceiling, median",
            "MB/s",
            median(&ceiling),
            median(&runc_rate),
            RUNC,
        ));
    }
    bench_results::record("ctr", &figures)?;
    Ok(())
}

fn print_start(
    clh: &[Duration],
    runc: &[Duration],
    template: &[Duration],
    ms: impl Fn(Duration) -> f64,
) {
    println!("{:<52} {:>10} {:>10}", "", "median", "min");
    for (label, samples) in [
        ("clh:  ctr run --rm busybox true", clh),
        ("runc: ctr run --rm busybox true", runc),
        ("clh, VM restored from a template", template),
    ] {
        let (med, min) = (median(samples), min(samples));
        println!("{label:<52} {:>7.0} ms {:>7.0} ms", ms(med), ms(min));
    }
    println!(
        "start ratio clh/runc: {:.1}x; template restore / cold boot: {:.2}x (medians)",
        ms(median(clh)) / ms(median(runc)),
        ms(median(template)) / ms(median(clh))
    );
}

fn print_stream(clh: &[f64], runc: &[f64], ceiling: &[f64]) {
    println!("{:<52} {:>10} {:>10}", "", "median", "best");
    for (label, samples) in [
        ("clh:  100 MiB stdout, first byte -> EOF", clh),
        ("runc: 100 MiB stdout, first byte -> EOF", runc),
        (
            "clh in-VM ceiling: the writer into a pipe, no host",
            ceiling,
        ),
    ] {
        let (med, best) = (median(samples), max(samples));
        println!("{label:<52} {med:>5.1} MB/s {best:>5.1} MB/s");
    }
    println!(
        "stdout ratio clh/runc: {:.3}x (median; every run counted exactly {STREAM_BYTES} bytes)",
        median(clh) / median(runc)
    );
    println!(
        "in-VM ceiling ratio to runc: {:.3}x; clh delivers {:.0}% of its ceiling (medians)",
        median(ceiling) / median(runc),
        100.0 * median(clh) / median(ceiling)
    );
}

/// `var` as a round count, `default` when unset.
fn rounds(var: &str, default: usize) -> Result<usize> {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{var}={v:?} is not a count")),
        Err(_) => Ok(default),
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

fn short(runtime: &str) -> &'static str {
    if runtime == CLH {
        "clh"
    } else {
        "runc"
    }
}

/// `ctr run --rm` spawned directly rather than through the harness's
/// `ctr()`, which polls for the exit every 20 ms: that would add up to
/// 20 ms to each sample. Same `--fifo-dir` as the harness, so ctr's FIFOs
/// stay in containerd's temp dir.
fn ctr_run(ctd: &PrivateContainerd, runtime: &str, id: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(ctd.version().bin_dir().join("ctr"));
    cmd.arg("--address")
        .arg(ctd.address())
        .args(["--namespace", ctd.namespace(), "run", "--fifo-dir"])
        .arg(ctd.dir().join("fifo"))
        .args(["--runtime", runtime, "--rm", BUSYBOX, id])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Wall time of `ctr run --rm <image> <id> true`.
fn run_true(ctd: &PrivateContainerd, runtime: &str, id: &str) -> Result<Duration> {
    let mut cmd = ctr_run(ctd, runtime, id, &["true"]);
    cmd.stdout(Stdio::null());
    let started = Instant::now();
    let child = cmd.spawn().context("spawning ctr")?;
    let (status, stderr, ended) = supervise(child, |_| Ok(()))?;
    ensure!(
        status.success(),
        "{runtime}: ctr run true failed ({status}): {stderr}"
    );
    Ok(ended - started)
}

/// MB/s (10^6 bytes) of a container's 100 MiB stdout as ctr delivers it,
/// from the first byte to end of file; fails unless exactly 100 MiB came.
fn run_stream(ctd: &PrivateContainerd, runtime: &str, id: &str) -> Result<f64> {
    let count = format!("{STREAM_BYTES}");
    let mut cmd = ctr_run(ctd, runtime, id, &["head", "-c", &count, "/dev/zero"]);
    cmd.stdout(Stdio::piped());
    let child = cmd.spawn().context("spawning ctr")?;
    let ((bytes, first, eof), status, stderr, _) = supervise_with(child, count_stdout)?;
    ensure!(
        status.success(),
        "{runtime}: ctr run head failed ({status}): {stderr}"
    );
    ensure!(
        bytes == STREAM_BYTES,
        "{runtime}: ctr delivered {bytes} bytes of stdout, not {STREAM_BYTES}"
    );
    let first = first.context("no first byte")?;
    Ok(bytes as f64 / (eof - first).as_secs_f64() / 1e6)
}

/// MB/s of the stream's writer inside a clh container when a pipe read in
/// the same container takes its output: `head` piped into `dd`, timed by
/// the guest's /proc/uptime (10 ms steps, over seconds here).
fn in_vm_ceiling(ctd: &PrivateContainerd, id: &str) -> Result<f64> {
    let script = format!(
        "read a _ < /proc/uptime; head -c {STREAM_BYTES} /dev/zero | dd of=/dev/null bs=262144 2>/dev/null; \\
         read b _ < /proc/uptime; echo \"$a $b\""
    );
    let mut cmd = ctr_run(ctd, CLH, id, &["sh", "-c", &script]);
    cmd.stdout(Stdio::piped());
    let child = cmd.spawn().context("spawning ctr")?;
    let (text, status, stderr, _) = supervise_with(child, |child| {
        let mut text = String::new();
        child
            .stdout
            .take()
            .context("ctr stdout not piped")?
            .read_to_string(&mut text)?;
        Ok(text)
    })?;
    ensure!(
        status.success(),
        "in-VM ceiling run failed ({status}): {stderr}"
    );
    let times: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("in-VM ceiling: not two uptimes: {text:?}"))?;
    let [start, end] = times[..] else {
        bail!("in-VM ceiling: not two uptimes: {text:?}");
    };
    ensure!(end > start, "in-VM ceiling: no time passed: {text:?}");
    Ok(STREAM_BYTES as f64 / (end - start) / 1e6)
}

/// Reads ctr's stdout to EOF with a large buffer, counting bytes; returns
/// the count and when the first byte and EOF arrived.
fn count_stdout(child: &mut Child) -> Result<(u64, Option<Instant>, Instant)> {
    let mut out = child.stdout.take().context("ctr stdout not piped")?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut first) = (0u64, None);
    loop {
        let n = out.read(&mut buf).context("reading ctr's stdout")?;
        if n == 0 {
            return Ok((bytes, first, Instant::now()));
        }
        first.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
}

/// [`supervise_with`] when the stdout needs no reading.
fn supervise(
    child: Child,
    f: impl FnOnce(&mut Child) -> Result<()> + Send + 'static,
) -> Result<(ExitStatus, String, Instant)> {
    let ((), status, stderr, ended) = supervise_with(child, f)?;
    Ok((status, stderr, ended))
}

/// Runs `f` on the child (reading its stdout), then waits for it, all on
/// a thread, while this one waits on a channel with [`RUN_TIMEOUT`]: a
/// hang kills ctr (which ends its pipes and so the thread) instead of
/// hanging the bench, and no sleep-polling blurs the measured exit time.
/// Returns `f`'s result, the status, stderr and when the exit was seen.
fn supervise_with<T: Send + 'static>(
    mut child: Child,
    f: impl FnOnce(&mut Child) -> Result<T> + Send + 'static,
) -> Result<(T, ExitStatus, String, Instant)> {
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    let mut stderr = child.stderr.take().context("ctr stderr not piped")?;
    // stderr on its own thread: a chatty ctr must not block on a full pipe.
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = f(&mut child);
        let status = child.wait();
        let ended = Instant::now();
        let _ = tx.send((result, status, ended));
    });
    let (result, status, ended) = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(done) => done,
        Err(_) => {
            // The child is not reaped until the thread's wait returns, so
            // the pid is still ours to kill.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = rx.recv();
            bail!("ctr run (pid {pid}) ran over {RUN_TIMEOUT:?}; killed");
        }
    };
    let stderr = stderr.join().unwrap_or_default();
    let result = result.with_context(|| format!("ctr stderr: {stderr}"))?;
    Ok((result, status?, stderr, ended))
}

fn median<T: Copy + PartialOrd>(samples: &[T]) -> T {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    sorted[sorted.len() / 2]
}

fn min(samples: &[Duration]) -> Duration {
    samples.iter().copied().min().unwrap_or_default()
}

fn max(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::MIN, f64::max)
}
