//! Metrics (docs/ARCHITECTURE.md, "Metrics"): a CRI pod's shim serves its
//! metrics on `<state_dir>/<sandbox id>/metrics.sock`, and
//! `containerd-shim-clh-v2 monitor` serves every pod's on one HTTP port.
//! Scraped twice through the monitor with an exec in between: the names
//! are there, every pod series carries the sandbox id and the pod's CRI
//! name, namespace and uid, and the agent RPC counts and the guest uptime
//! moved. Once the pod is removed the socket is gone, the monitor reports
//! no pod, and the kubelet's leak checks find nothing left.
//!
//! Run one at a time (`-- --test-threads=1`): it boots a VM.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet, BUSYBOX};
use clh_tests::ctr;
use containerd_shim_clh_v2::metrics::text::{parse_sample, Sample};

const AGENT_TIMEOUT_MS: u64 = 120_000;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn pod_metrics_through_the_monitor() {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (s, cri) = ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS);
    metrics(&s, &cri).unwrap();
}

/// The monitor process, killed and reaped when dropped.
struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `monitor` on a free port; its address, read from the line it
/// prints once it listens.
fn start_monitor(cri: &CriSetup, config: &Path) -> Result<(Monitor, SocketAddr)> {
    let shim = cri.shim_dir.as_ref().context("the shim's directory")?;
    let mut child = Command::new(shim.join("containerd-shim-clh-v2"))
        .args(["monitor", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the monitor")?;
    let stdout = child.stdout.take().context("the monitor's stdout")?;
    let monitor = Monitor(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
    });
    let line = rx
        .recv_timeout(IO_TIMEOUT)
        .context("the monitor did not say where it listens")??;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("no address in {line:?}"))?;
    Ok((monitor, addr.parse()?))
}

/// `GET /metrics` on the monitor: the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (head, body) = clh_tests::pod_metrics::get_metrics(stream)?;
    ensure!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(body)
}

fn samples(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(parse_sample)
        .collect()
}

/// The value of the one sample named `name` of sandbox `id` whose labels
/// include `labels`.
fn value(all: &[Sample], id: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let found: Vec<&Sample> = all
        .iter()
        .filter(|s| s.name == name && s.label("sandbox_id") == Some(id))
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .collect();
    let [one] = found.as_slice() else {
        bail!("{} samples {name}{labels:?} of {id}", found.len());
    };
    let value = one.rest.split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{name}: value {value:?}"))
}

fn metrics(s: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let (monitor, addr) = start_monitor(setup, &s.config)?;
    let pod = k.run_pod(&k.pod("metrics").namespace("team-a"))?;
    let meta = pod.config.metadata.clone().unwrap_or_default();
    let sleeper = ContainerBuilder::new("app", BUSYBOX).command(&["sleep", "100000"]);
    let app = k.run_container(&pod, &sleeper)?;

    let socket = s.state_dir.join(&pod.id).join("metrics.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket)?.permissions());
    ensure!(mode & 0o777 == 0o600, "metrics.sock is {mode:o}");

    let first_body = scrape(addr)?;
    let first = samples(&first_body);
    // Every family the issue names.
    for name in [
        "clh_pod_info",
        "clh_vm_boot_seconds",
        "clh_vm_vcpus",
        "clh_vm_memory_bytes",
        "clh_agent_up",
        "clh_agent_rpc_duration_seconds_bucket",
        "clh_agent_rpc_duration_seconds_sum",
        "clh_agent_rpc_duration_seconds_count",
        "clh_agent_rpc_errors_total",
        "clh_guest_uptime_seconds",
        "clh_guest_memory_total_bytes",
        "clh_guest_memory_available_bytes",
        "clh_guest_agent_resident_memory_bytes",
        "clh_guest_load1",
        "clh_guest_load5",
        "clh_guest_load15",
        "clh_guest_cpus_online",
        "clh_guest_cpu_seconds_total",
        "clh_process_resident_memory_bytes",
        "clh_process_open_fds",
        "clh_process_threads",
        "clh_process_cpu_seconds_total",
        "clh_monitor_scrape_up",
        "clh_monitor_scrape_duration_seconds",
        "clh_monitor_pods",
        "clh_monitor_scrape_errors_total",
    ] {
        ensure!(
            first.iter().any(|s| s.name == name),
            "no {name} in:\n{first_body}"
        );
    }
    // Each family once: HELP and TYPE are not repeated.
    let mut types: Vec<&str> = first_body
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .collect();
    let all_types = types.len();
    types.sort();
    types.dedup();
    ensure!(types.len() == all_types, "a family is declared twice");
    // Every pod series carries the pod's labels.
    for sample in first.iter().filter(|s| !s.name.starts_with("clh_monitor_")) {
        for (label, want) in [
            ("sandbox_id", pod.id.as_str()),
            ("pod_name", meta.name.as_str()),
            ("pod_namespace", meta.namespace.as_str()),
            ("pod_uid", meta.uid.as_str()),
        ] {
            ensure!(
                sample.label(label) == Some(want),
                "{} has {label}={:?}, not {want:?}",
                sample.name,
                sample.label(label)
            );
        }
    }
    ensure!(meta.namespace == "team-a" && meta.name == "metrics");
    ensure!(value(&first, &pod.id, "clh_agent_up", &[])? == 1.0);
    ensure!(value(&first, &pod.id, "clh_vm_boot_seconds", &[])? > 0.0);
    // The start's steps, the shim's and the guest's (issue 14).
    for step in [
        "checks",
        "cgroup",
        "state_dir",
        "network",
        "virtiofsd",
        "vmm",
        "accounting",
        "guest_boot",
        "agent_connect",
        "rng_seed",
    ] {
        value(
            &first,
            &pod.id,
            "clh_pod_start_step_seconds",
            &[("step", step)],
        )?;
    }
    ensure!(
        value(
            &first,
            &pod.id,
            "clh_pod_start_step_seconds",
            &[("step", "guest_boot")]
        )? > 0.0
    );
    ensure!(
        value(&first, &pod.id, "clh_guest_memory_total_bytes", &[])?
            >= value(&first, &pod.id, "clh_guest_memory_available_bytes", &[])?
    );
    ensure!(value(&first, &pod.id, "clh_guest_cpus_online", &[])? >= 1.0);
    for process in ["shim", "vmm", "virtiofsd"] {
        let p = [("process", process)];
        ensure!(value(&first, &pod.id, "clh_process_resident_memory_bytes", &p)? > 0.0);
        ensure!(value(&first, &pod.id, "clh_process_open_fds", &p)? > 0.0);
        ensure!(value(&first, &pod.id, "clh_process_threads", &p)? >= 1.0);
    }
    let id = pod.id.as_str();
    ensure!(value(&first, id, "clh_monitor_scrape_up", &[])? == 1.0);

    let r = k
        .cri()
        .exec_sync(&app, &["echo", "hello"], Duration::from_secs(30))?;
    ensure!(r.exit_code == 0 && r.stdout.trim() == "hello", "{r:?}");

    let second = samples(&scrape(addr)?);
    let count = |all: &[Sample], method: &str| {
        value(
            all,
            id,
            "clh_agent_rpc_duration_seconds_count",
            &[("method", method)],
        )
        .unwrap_or(0.0)
    };
    // Each scrape calls Check; the exec called ExecProcess and StartProcess.
    ensure!(count(&second, "Check") > count(&first, "Check"));
    ensure!(count(&second, "ExecProcess") > count(&first, "ExecProcess"));
    ensure!(count(&second, "StartProcess") > count(&first, "StartProcess"));
    let inf = |all: &[Sample]| {
        value(
            all,
            id,
            "clh_agent_rpc_duration_seconds_bucket",
            &[("method", "Check"), ("le", "+Inf")],
        )
    };
    ensure!(inf(&second)? == count(&second, "Check"));
    let uptime = |all: &[Sample]| value(all, id, "clh_guest_uptime_seconds", &[]);
    ensure!(
        uptime(&second)? > uptime(&first)?,
        "the guest uptime did not move"
    );

    k.remove_pod(&pod)?;
    ensure!(!socket.exists(), "metrics.sock outlived its pod");
    let after = scrape(addr)?;
    ensure!(after.contains("clh_monitor_pods 0\n"), "{after}");
    ensure!(!after.contains(id), "{after}");
    drop(monitor);
    k.finish()
}
