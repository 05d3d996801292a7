//! Kubernetes pods through CRI whose VMs are restored from a template
//! (`[runtime] templates = true`; docs/design/0004-vm-templates.md).
//!
//! - The CRI scenarios of cri_clh.rs, unchanged: two containers, stats,
//!   OOM, streaming (exec, attach, port-forward), five pods at once. A
//!   watch over the shim's state dir fails each one that boots a pod VM
//!   instead of restoring it; five pods at once make one template.
//! - `restored_pods_have_their_own_identity`: two pods of different names
//!   on a bridge network, both restored from one template, have their own
//!   hostnames, boot ids, RNG output and MACs, and the host's wall-clock
//!   time although the template was saved seconds before.
//!
//! Volumes (cri_volumes.rs) and networking (cri_network.rs) run restored
//! in their own files. Run one at a time (`-- --test-threads=1`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{scenarios, ContainerBuilder, ContainerState, CriSetup, Kubelet, Pod};
use clh_tests::ctr;
use clh_tests::templates::{self, RestoreWatch};
use tempfile::TempDir;

/// Five TCG restores at once, after a template boot, on a small host.
const AGENT_TIMEOUT_MS: u64 = 120_000;
/// How far a restored guest's clock may be from the host's: the exec's
/// round trip, and `date`'s whole seconds.
const CLOCK_SLACK: Duration = Duration::from_secs(2);

/// A CRI setup with templates on, its store, and a watch over its pods.
struct Restored {
    _shim: ctr::Setup,
    store: TempDir,
    cri: CriSetup,
    watch: RestoreWatch,
}

fn setup() -> Restored {
    let s = ctr::setup().expect("shim setup");
    let store = templates::enable(&s).expect("templates on");
    let watch = RestoreWatch::start(&s.state_dir);
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (shim, cri) = ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS);
    Restored {
        _shim: shim,
        store,
        cri,
        watch,
    }
}

#[test]
fn two_containers() {
    let r = setup();
    let seen = scenarios::two_containers(&r.cri).unwrap();
    let [a, b] = &seen.boot_ids;
    assert_eq!(a, b, "the pod's containers run in one VM");
    r.watch.all_restored(1).unwrap();
}

#[test]
fn container_stats() {
    let r = setup();
    scenarios::container_stats(&r.cri).unwrap();
    r.watch.all_restored(1).unwrap();
}

#[test]
fn oom_killed() {
    let r = setup();
    scenarios::oom_killed(&r.cri).unwrap();
    r.watch.all_restored(1).unwrap();
}

#[test]
fn streaming() {
    let r = setup();
    scenarios::streaming(&r.cri).unwrap();
    r.watch.all_restored(1).unwrap();
}

#[test]
fn parallel_pods_make_one_template() {
    let r = setup();
    scenarios::parallel_pods(&r.cri).unwrap();
    r.watch.all_restored(5).unwrap();
    let made = templates::ready(r.store.path()).unwrap();
    assert_eq!(made.len(), 1, "templates: {made:?}");
}

/// What a pod's container reports of its VM.
#[derive(Debug, PartialEq)]
struct Identity {
    hostname: String,
    boot_id: String,
    random: String,
    mac: String,
}

const IDENTITY_SCRIPT: &str = "hostname; cat /proc/sys/kernel/random/boot_id; \
     head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
     cat /sys/class/net/eth0/address; date +%s";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Runs pod `name` and reads its identity; checks its clock against the
/// host's around the exec.
fn identity_of(k: &Kubelet, name: &str) -> Result<(Pod, Identity)> {
    let pod = k.run_pod(&k.pod(name))?;
    let id = k.run_container(&pod, &ContainerBuilder::sleeper("c"))?;
    k.cri()
        .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
    let before = unix_now();
    let out = k.sh(&id, IDENTITY_SCRIPT)?;
    let after = unix_now();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let [hostname, boot_id, random, mac, date] = lines[..] else {
        anyhow::bail!("{name}: unexpected output {out:?}");
    };
    let guest: u64 = date.parse().with_context(|| format!("date: {date:?}"))?;
    let slack = CLOCK_SLACK.as_secs();
    ensure!(
        guest + slack >= before && guest <= after + slack,
        "{name}: the guest's clock says {guest}, the host's {before}..{after}"
    );
    let identity = Identity {
        hostname: hostname.into(),
        boot_id: boot_id.into(),
        random: random.into(),
        mac: mac.into(),
    };
    Ok((pod, identity))
}

/// The template's age, from its snapshot's modification time.
fn template_age(store: &Path) -> Result<Duration> {
    let made = templates::ready(store)?;
    let [template] = &made[..] else {
        anyhow::bail!("templates: {made:?}");
    };
    let saved = std::fs::metadata(template.join("snapshot"))?.modified()?;
    Ok(saved.elapsed().unwrap_or_default())
}

#[test]
fn restored_pods_have_their_own_identity() {
    let r = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&r.cri)?;
        k.use_bridge_networks(1)?;
        let (alpha_pod, alpha) = identity_of(&k, "alpha")?;
        // The second pod restores a template older than the clock's
        // slack, whose clock would lag by that much without SetIdentity.
        // The first pod's start and exec take longer than that already;
        // this only makes sure of it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while template_age(r.store.path())? <= CLOCK_SLACK * 2 {
            ensure!(std::time::Instant::now() < deadline, "template age");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (beta_pod, beta) = identity_of(&k, "beta")?;
        ensure!(
            alpha.hostname == "alpha" && beta.hostname == "beta",
            "{alpha:?} {beta:?}"
        );
        ensure!(
            alpha.boot_id != beta.boot_id,
            "one boot id: {alpha:?} {beta:?}"
        );
        ensure!(
            alpha.random != beta.random,
            "one RNG stream: {alpha:?} {beta:?}"
        );
        ensure!(alpha.mac != beta.mac, "one MAC: {alpha:?} {beta:?}");
        k.remove_pod(&alpha_pod)?;
        k.remove_pod(&beta_pod)?;
        k.finish()
    };
    run().unwrap();
    r.watch.all_restored(2).unwrap();
}
