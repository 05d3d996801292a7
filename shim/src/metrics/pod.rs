//! One shim's metrics: `<state_dir>/<sandbox id>/metrics.sock` answers
//! `GET /metrics` with the pod's VM, guest, agent RPC and host process
//! figures, read afresh on every request.

use std::collections::BTreeMap;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use clh_agent_client::metrics::rpc_stats;
use clh_agent_protocol::CheckResponse;
use serde_json::Value;
use tokio::task::JoinSet;

use super::http;
use super::text::{Exposition, Kind};
use crate::vm::PodVm;

/// The socket's name in the VM directory.
pub const SOCKET_NAME: &str = "metrics.sock";

/// The deadline of the agent's Check during a scrape: a scrape answers
/// without the guest's figures (and `clh_agent_up 0`) rather than wait.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Requests answered at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;

/// The CRI names of a pod, from its sandbox spec's annotations (empty for
/// a `ctr run` container).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodLabels {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

impl PodLabels {
    pub fn from_spec(spec: &Value) -> Self {
        let annotation = |key: &str| {
            spec.pointer("/annotations")
                .and_then(|a| a.get(key))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Self {
            name: annotation("io.kubernetes.cri.sandbox-name"),
            namespace: annotation("io.kubernetes.cri.sandbox-namespace"),
            uid: annotation("io.kubernetes.cri.sandbox-uid"),
        }
    }
}

/// Binds the VM's metrics socket (owner-only) and serves it until the VM
/// stops (the task is the VM's: [`PodVm::stop`] aborts it, and removing
/// the directory removes the socket).
pub fn serve(vm: &Arc<PodVm>, labels: PodLabels) -> std::io::Result<()> {
    let path = vm.dir().join(SOCKET_NAME);
    let listener = bind(&path)?;
    let task = accept_loop(listener, Arc::downgrade(vm), Arc::new(labels));
    vm.track(tokio::spawn(task));
    Ok(())
}

fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

async fn accept_loop(listener: tokio::net::UnixListener, vm: Weak<PodVm>, labels: Arc<PodLabels>) {
    // Dropped (aborting every answer in flight) when this task is aborted.
    let mut answers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if answers.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _)) => {
                    let (vm, labels) = (vm.clone(), labels.clone());
                    answers.spawn(async move {
                        http::answer(stream, || async move {
                            match vm.upgrade() {
                                Some(vm) => collect(&vm, &labels).await,
                                None => String::new(),
                            }
                        })
                        .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept");
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = answers.join_next(), if !answers.is_empty() => {}
        }
    }
}

/// The pod's exposition now.
pub async fn collect(vm: &PodVm, labels: &PodLabels) -> String {
    let mut e = Exposition::new();
    e.family(
        "clh_pod_info",
        Kind::Gauge,
        "The pod of this VM (CRI names; empty for a ctr container) and its agent's version.",
    )
    .sample(
        "clh_pod_info",
        &[
            ("pod_name", &labels.name),
            ("pod_namespace", &labels.namespace),
            ("pod_uid", &labels.uid),
            ("agent_version", vm.agent().agent_version()),
        ],
        1.0,
    );
    e.single(
        "clh_vm_boot_seconds",
        Kind::Gauge,
        "Time from spawning the VMM to the guest agent's first answer.",
        vm.boot_to_agent().as_secs_f64(),
    );
    e.family(
        "clh_pod_start_step_seconds",
        Kind::Gauge,
        "How long each step of the pod VM's start took (the shim's share and the guest's; network and virtiofsd overlap).",
    );
    for span in vm.start_timeline().spans() {
        e.sample(
            "clh_pod_start_step_seconds",
            &[("step", span.step)],
            span.took.as_secs_f64(),
        );
    }
    let size = vm.size();
    e.single(
        "clh_vm_vcpus",
        Kind::Gauge,
        "vCPUs of the VM.",
        f64::from(size.vcpus),
    );
    e.single(
        "clh_vm_memory_bytes",
        Kind::Gauge,
        "Memory of the VM.",
        f64::from(size.memory_mib) * 1024.0 * 1024.0,
    );
    let check = if vm.is_dead() {
        None
    } else {
        match tokio::time::timeout(CHECK_TIMEOUT, vm.agent().check()).await {
            Ok(Ok(reply)) => Some(reply),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "metrics: agent Check");
                None
            }
            Err(_) => None,
        }
    };
    e.single(
        "clh_agent_up",
        Kind::Gauge,
        "Whether the guest agent answered Check for this scrape.",
        if check.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(check) = &check {
        guest(&mut e, check);
    }
    // After Check: this scrape's own call is counted.
    agent_rpcs(&mut e);
    let mut processes = vec![("shim", std::process::id())];
    processes.extend(vm.processes());
    host_processes(&mut e, &processes);
    e.finish()
}

fn guest(e: &mut Exposition, c: &CheckResponse) {
    const KIB: f64 = 1024.0;
    e.single(
        "clh_guest_uptime_seconds",
        Kind::Gauge,
        "Time since the guest booted (CLOCK_BOOTTIME).",
        c.uptime_ms as f64 / 1000.0,
    );
    e.single(
        "clh_guest_memory_total_bytes",
        Kind::Gauge,
        "MemTotal of the guest's /proc/meminfo.",
        c.mem_total_kib as f64 * KIB,
    );
    e.single(
        "clh_guest_memory_available_bytes",
        Kind::Gauge,
        "MemAvailable of the guest's /proc/meminfo.",
        c.mem_available_kib as f64 * KIB,
    );
    e.single(
        "clh_guest_agent_resident_memory_bytes",
        Kind::Gauge,
        "Resident memory of the guest agent (PID 1).",
        c.agent_rss_kib as f64 * KIB,
    );
    for (name, value, what) in [
        ("clh_guest_load1", c.load1, "1"),
        ("clh_guest_load5", c.load5, "5"),
        ("clh_guest_load15", c.load15, "15"),
    ] {
        e.single(
            name,
            Kind::Gauge,
            &format!("The guest's {what}-minute load average."),
            value,
        );
    }
    e.single(
        "clh_guest_cpus_online",
        Kind::Gauge,
        "CPUs online in the guest.",
        f64::from(c.cpus_online),
    );
    if let Some(cpu) = c.cpu.as_ref() {
        e.family(
            "clh_guest_cpu_seconds_total",
            Kind::Counter,
            "CPU time of the guest by mode, all its CPUs together (/proc/stat).",
        );
        for (mode, ms) in [
            ("user", cpu.user_ms),
            ("nice", cpu.nice_ms),
            ("system", cpu.system_ms),
            ("idle", cpu.idle_ms),
            ("iowait", cpu.iowait_ms),
            ("irq", cpu.irq_ms),
            ("softirq", cpu.softirq_ms),
            ("steal", cpu.steal_ms),
        ] {
            e.sample(
                "clh_guest_cpu_seconds_total",
                &[("mode", mode)],
                ms as f64 / 1000.0,
            );
        }
    }
    type Field = fn(&clh_agent_protocol::GuestNetDev) -> u64;
    let net: [(&str, &str, Field); 8] = [
        ("receive_bytes", "Bytes received", |d| d.rx_bytes),
        ("receive_packets", "Packets received", |d| d.rx_packets),
        ("receive_errs", "Receive errors", |d| d.rx_errors),
        ("receive_drop", "Received packets dropped", |d| d.rx_dropped),
        ("transmit_bytes", "Bytes sent", |d| d.tx_bytes),
        ("transmit_packets", "Packets sent", |d| d.tx_packets),
        ("transmit_errs", "Transmit errors", |d| d.tx_errors),
        ("transmit_drop", "Sent packets dropped", |d| d.tx_dropped),
    ];
    if !c.net.is_empty() {
        for (suffix, help, field) in net {
            let name = format!("clh_guest_network_{suffix}_total");
            e.family(
                &name,
                Kind::Counter,
                &format!("{help} by the guest's interface (/proc/net/dev)."),
            );
            for dev in &c.net {
                e.sample(&name, &[("device", &dev.name)], field(dev) as f64);
            }
        }
    }
}

fn agent_rpcs(e: &mut Exposition) {
    let stats = rpc_stats();
    e.family(
        "clh_agent_rpc_duration_seconds",
        Kind::Histogram,
        "Latency of the shim's calls to the guest agent by method (not the long polls WaitProcess and GetOomEvent).",
    );
    for (method, s) in &stats {
        let h = &s.latency;
        e.histogram(
            "clh_agent_rpc_duration_seconds",
            &[("method", method)],
            &h.cumulative(),
            h.sum(),
            h.count(),
        );
    }
    e.family(
        "clh_agent_rpc_errors_total",
        Kind::Counter,
        "Calls to the guest agent that failed, by method.",
    );
    for (method, s) in &stats {
        e.sample(
            "clh_agent_rpc_errors_total",
            &[("method", method)],
            s.errors as f64,
        );
    }
}

/// A host process's figures from /proc.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcStats {
    pub rss_bytes: u64,
    pub threads: u64,
    pub fds: u64,
    pub cpu_seconds: f64,
}

impl std::ops::AddAssign for ProcStats {
    fn add_assign(&mut self, o: Self) {
        self.rss_bytes += o.rss_bytes;
        self.threads += o.threads;
        self.fds += o.fds;
        self.cpu_seconds += o.cpu_seconds;
    }
}

/// `pid`'s figures; `None` once it has gone.
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let (rss_kib, threads) = parse_status(&status);
    Some(ProcStats {
        rss_bytes: rss_kib * 1024,
        threads,
        fds,
        cpu_seconds: parse_stat_cpu_ticks(&stat).unwrap_or(0) as f64 / clock_ticks(),
    })
}

/// `(VmRSS in KiB, Threads)` of /proc/<pid>/status (a zombie has no VmRSS).
pub fn parse_status(status: &str) -> (u64, u64) {
    let field = |label: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

/// utime + stime of /proc/<pid>/stat, in clock ticks. The fields are
/// counted after the command's closing parenthesis (it may hold spaces).
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn host_processes(e: &mut Exposition, processes: &[(&'static str, u32)]) {
    let mut by_role: BTreeMap<&str, ProcStats> = BTreeMap::new();
    for (role, pid) in processes {
        if let Some(s) = proc_stats(*pid) {
            *by_role.entry(role).or_default() += s;
        }
    }
    type Field = fn(&ProcStats) -> f64;
    let families: [(&str, Kind, &str, Field); 4] = [
        (
            "clh_process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the pod's host processes by role (shim, vmm, vmm_helper, virtiofsd), with what each forked.",
            |s| s.rss_bytes as f64,
        ),
        (
            "clh_process_open_fds",
            Kind::Gauge,
            "Open file descriptors of the pod's host processes by role.",
            |s| s.fds as f64,
        ),
        (
            "clh_process_threads",
            Kind::Gauge,
            "Threads of the pod's host processes by role.",
            |s| s.threads as f64,
        ),
        (
            "clh_process_cpu_seconds_total",
            Kind::Counter,
            "CPU time (user and system) of the pod's host processes by role.",
            |s| s.cpu_seconds,
        ),
    ];
    for (name, kind, help, field) in families {
        e.family(name, kind, help);
        for (role, s) in &by_role {
            e.sample(name, &[("process", role)], field(s));
        }
    }
}
