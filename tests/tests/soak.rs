//! REL-SOAK-01: pods made and removed over and over through CRI on real
//! VMs, while one anchor pod lives throughout; after every cycle each
//! count of what a pod uses must come back to its baseline: our processes
//! (shims, VMMs, virtiofsd, vsock helpers), mounts, open fds of containerd
//! and of the anchor pod's shim, cgroups, Unix sockets (files under the
//! state dirs and the shims' listening sockets), and entries of the shim's
//! and containerd's state dirs. Only what belongs to the test's own
//! containerd and state dir is counted.
//!
//! `make soak` runs `SOAK_PODS` pods (default 3) at once for `SOAK_CYCLES`
//! cycles (default 10), sized for a 2-core host; `make test` runs the
//! short version this file defaults to (1 pod, 2 cycles). A cycle: run
//! the pods, each with a container; exec in each and in the anchor; run
//! and remove an extra container in the anchor; remove the pods. The
//! counts are printed per cycle, then a flat-line verdict.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::containerd::{all_pids, cmdline};
use clh_tests::cri::{ContainerBuilder, Kubelet, BUSYBOX};
use clh_tests::ctr;

const AGENT_TIMEOUT_MS: u64 = 120_000;
/// How long the counts may take to come back after a cycle (containerd
/// closes its connections to a shim asynchronously).
const SETTLE: Duration = Duration::from_secs(30);
/// Our processes: a count of each must return to its baseline.
const PROGRAMS: &[&str] = &[
    "containerd-shim-clh-v2",
    "qemu-system-x86_64",
    "cloud-hypervisor",
    "virtiofsd",
    "vhost-device-vsock",
];

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One reading of everything a pod uses on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counts {
    processes: usize,
    mounts: usize,
    containerd_fds: usize,
    anchor_shim_fds: usize,
    cgroups: usize,
    unix_sockets: usize,
    state_entries: usize,
}

impl Counts {
    const HEADER: &'static str =
        "cycle  procs  mounts  ctrd-fds  shim-fds  cgroups  sockets  state";

    fn row(&self, label: &str) -> String {
        format!(
            "{label:>5}  {:>5}  {:>6}  {:>8}  {:>8}  {:>7}  {:>7}  {:>5}",
            self.processes,
            self.mounts,
            self.containerd_fds,
            self.anchor_shim_fds,
            self.cgroups,
            self.unix_sockets,
            self.state_entries
        )
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Entries under `dir`, recursively, never following a symlink, and how
/// many of them are sockets.
fn entries(dir: &Path) -> (usize, usize) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut counts = (0, 0);
    for e in list.flatten() {
        counts.0 += 1;
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                let below = entries(&e.path());
                counts.0 += below.0;
                counts.1 += below.1;
            }
            Ok(t) if t.is_socket() => counts.1 += 1,
            _ => {}
        }
    }
    counts
}

/// Directories under `dir` (cgroupfs: one per cgroup), recursively.
fn dirs(dir: &Path) -> usize {
    let Ok(list) = std::fs::read_dir(dir) else {
        return 0;
    };
    list.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| 1 + dirs(&e.path()))
        .sum()
}

/// Only what belongs to this test's containerd and shim state dir counts:
/// other tests may run VMs on the same host.
fn read_counts(k: &Kubelet, state_dir: &Path, anchor_shim: u32) -> Result<Counts> {
    let ctd = k.containerd();
    let containerd = ctd.pid().context("containerd is not running")?;
    let ours = [
        state_dir.display().to_string(),
        ctd.address().display().to_string(),
    ];
    let processes = all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.first()
                .is_some_and(|a| PROGRAMS.iter().any(|p| a.ends_with(p)))
                && args
                    .iter()
                    .any(|a| ours.iter().any(|o| a.contains(o.as_str())))
        })
        .count();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounts = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(state_dir) || Path::new(p).starts_with(ctd.dir()))
        .count();
    let cri_root = ctd.cri_cgroup_root();
    let cgroups = std::fs::read_dir("/sys/fs/cgroup")?
        .flatten()
        .map(|controller| dirs(&controller.path().join(cri_root.trim_start_matches('/'))))
        .sum();
    let (shim_entries, shim_sockets) = entries(state_dir);
    let (ctd_entries, ctd_sockets) = entries(&ctd.dir().join("state"));
    Ok(Counts {
        processes,
        mounts,
        containerd_fds: fds(containerd),
        anchor_shim_fds: fds(anchor_shim),
        cgroups,
        unix_sockets: shim_sockets + ctd_sockets + ctd.shim_sockets_now().len(),
        state_entries: shim_entries + ctd_entries,
    })
}

/// One cycle: `pods` pods with a container each, an exec in each and in
/// the anchor, an extra container run and removed in the anchor, then
/// every pod removed.
fn cycle(k: &Kubelet, anchor: &clh_tests::cri::Pod, cycle: usize, pods: usize) -> Result<()> {
    let mut made = Vec::new();
    for n in 0..pods {
        let pod = k.run_pod(&k.pod(&format!("soak-{cycle}-{n}")))?;
        let id = k.run_container(&pod, &ContainerBuilder::sleeper("work"))?;
        made.push((pod, id));
    }
    for (_, id) in &made {
        let out = k.sh(id, "echo soak")?;
        ensure!(out.trim() == "soak", "exec answered {out:?}");
    }
    let extra = ContainerBuilder::new(&format!("extra-{cycle}"), BUSYBOX).command(&["true"]);
    let id = k.run_container(anchor, &extra)?;
    k.cri().wait_container_state(
        &id,
        clh_tests::cri::ContainerState::ContainerExited,
        k.timeout(),
    )?;
    k.cri().remove_container(&id)?;
    for (pod, _) in &made {
        k.remove_pod(pod)?;
    }
    Ok(())
}

#[test]
fn rel_soak_01_counts_stay_flat() {
    let (pods, cycles) = (env_count("SOAK_PODS", 1), env_count("SOAK_CYCLES", 2));
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (s, cri) = ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS);
    soak(&s, &cri, pods, cycles).unwrap();
}

fn soak(s: &ctr::Setup, cri: &clh_tests::cri::CriSetup, pods: usize, cycles: usize) -> Result<()> {
    let k = Kubelet::start(cri)?;
    let anchor = k.run_pod(&k.pod("soak-anchor"))?;
    let c = ContainerBuilder::new("anchor", BUSYBOX).command(&["sleep", "100000"]);
    let anchor_id = k.run_container(&anchor, &c)?;
    k.sh(&anchor_id, "true")?;
    let shims = k.containerd().shim_pids();
    ensure!(
        shims.len() == 1,
        "expected the anchor's shim alone, found {shims:?}"
    );
    let anchor_shim = u32::try_from(shims[0])?;
    // A warm-up cycle first: containerd caches images and connections on
    // first use.
    cycle(&k, &anchor, 0, pods)?;
    let baseline = settled(&k, &s.state_dir, anchor_shim, None)?;
    println!("REL-SOAK-01: {pods} pod(s) x {cycles} cycle(s)");
    println!("{}", Counts::HEADER);
    println!("{}", baseline.row("base"));
    let mut drifted = Vec::new();
    for n in 1..=cycles {
        let started = Instant::now();
        cycle(&k, &anchor, n, pods).with_context(|| format!("cycle {n}"))?;
        let now = settled(&k, &s.state_dir, anchor_shim, Some(&baseline))?;
        println!(
            "{}   ({:.1} s)",
            now.row(&n.to_string()),
            started.elapsed().as_secs_f64()
        );
        if now != baseline {
            drifted.push(n);
        }
    }
    if drifted.is_empty() {
        println!("REL-SOAK-01 verdict: flat (every count back at its baseline after each cycle)");
    } else {
        println!("REL-SOAK-01 verdict: NOT flat after cycles {drifted:?}");
    }
    k.remove_pod(&anchor)?;
    k.finish()?;
    if !drifted.is_empty() {
        bail!("counts did not return to the baseline after cycles {drifted:?}");
    }
    Ok(())
}

/// The counts once they stop moving (two equal readings in a row), or,
/// with a `baseline`, once they equal it; the last reading at the deadline.
fn settled(
    k: &Kubelet,
    state_dir: &Path,
    anchor_shim: u32,
    baseline: Option<&Counts>,
) -> Result<Counts> {
    let mut last = read_counts(k, state_dir, anchor_shim)?;
    let reached = k.cri().wait_for("the counts to settle", SETTLE, |_| {
        let now = read_counts(k, state_dir, anchor_shim)?;
        let done = match baseline {
            Some(b) => now == *b,
            None => now == last,
        };
        last = now.clone();
        Ok(done.then_some(now))
    });
    // At the deadline: the last reading, which the caller reports.
    Ok(reached.unwrap_or(last))
}
