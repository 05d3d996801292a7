//! `make bench` (density): host memory per idle clh pod after its container
//! allocated and freed 200 MiB, in one run on one private containerd 2.1,
//! for three shim configurations: the defaults; without free page
//! reporting (`[guest] free_page_reporting = false`); with QEMU's default
//! TCG translation buffer (`[hypervisor] qemu_tb_size_mib = 0`, 1 GiB,
//! where ours is 32 MiB).
//!
//! Each pod runs a busybox sleeper; `dd bs=200M count=1` then runs in it
//! through ExecSync: dd's 200 MiB buffer is written whole (every page
//! becomes resident in guest RAM, so on the host) and freed when dd exits.
//! The pods' host processes are then sampled until their PSS settles
//! (idle_memory.rs, podmem.rs: which processes, why PSS). Without
//! reporting the freed pages stay resident in the VMM for the pod's life;
//! with it the guest reports them in 2 MiB blocks and the VMM discards
//! them. The translation buffer is most of the VMM's memory outside
//! guest RAM.
//!
//! No figure is printed unless every pod ran and nothing was left behind.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::bench_results::{self, Figure};
use clh_tests::cri::{ContainerBuilder, Kubelet, Pod};
use clh_tests::ctr;
use clh_tests::idle_memory::{print_memory, settle, IdleMemory};
use clh_tests::podmem;

/// Pods measured per configuration.
const PODS: usize = 2;
/// What the container allocates, writes whole and frees.
const ALLOC_MIB: u64 = 200;
const AGENT_TIMEOUT_MS: u64 = 120_000;
/// dd under TCG: a second or two; the margin is for a loaded host.
const DD_TIMEOUT: Duration = Duration::from_secs(120);
/// Each configuration: its label and the `[guest]` and `[hypervisor]`
/// keys it sets. The first is the defaults, the baseline of the others.
const CONFIGS: [(&str, &str, &str); 3] = [
    ("defaults", "", ""),
    ("no free page reporting", "free_page_reporting = false", ""),
    ("QEMU's 1 GiB TCG buffer", "", "qemu_tb_size_mib = 0"),
];

fn main() -> Result<()> {
    let s = ctr::setup()?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let setup = ctr::cri_setup(&s, ctr::release_shim_dir()?, images, AGENT_TIMEOUT_MS)?;
    let k = Kubelet::start(&setup)?;
    println!(
        "density benchmark: {PODS} idle clh pods per configuration (QEMU TCG, 512 MiB VMs), \
         each after `dd bs={ALLOC_MIB}M count=1` in its container; configurations: {}",
        CONFIGS.map(|c| c.0).join(", ")
    );
    let config = std::fs::read_to_string(&s.config).context("reading the shim config")?;
    let mut groups = Vec::new();
    for (label, guest, hypervisor) in CONFIGS {
        std::fs::write(&s.config, &config).context("restoring the shim config")?;
        ctr::add_key(&s.config, "guest", guest)?;
        ctr::add_key(&s.config, "hypervisor", hypervisor)?;
        groups.push(after_alloc_and_free(&k, &s.state_dir, label).context(label)?);
    }
    k.finish()
        .context("leftovers after the bench; no figures printed")?;

    print_memory(
        &format!("host memory per idle pod after {ALLOC_MIB} MiB freed (PSS)"),
        &groups,
    );
    let [ours, no_reporting, big_tb] = [0, 1, 2].map(|i| groups[i].per_pod_mib());
    let rest = |(pss, guest): (f64, f64)| pss - guest;
    println!();
    println!(
        "summary (QEMU TCG, this host): after a container freed {ALLOC_MIB} MiB, an idle pod \
         holds {:.0} MiB of host memory ({:.0} MiB of it guest RAM) vs {:.0} MiB ({:.0} MiB) \
         without free page reporting: {:.2}x; outside guest RAM {:.0} MiB vs {:.0} MiB with \
         QEMU's default TCG buffer",
        ours.0,
        ours.1,
        no_reporting.0,
        no_reporting.1,
        ours.0 / no_reporting.0,
        rest(ours),
        rest(big_tb),
    );
    let figure = |what: &str, ours: f64, base: f64, base_name: &str| {
        Figure::new(what, "MiB", ours, base, base_name)
    };
    bench_results::record(
        "density",
        &[
            figure(
                &format!("idle pod host PSS after {ALLOC_MIB} MiB freed"),
                ours.0,
                no_reporting.0,
                CONFIGS[1].0,
            ),
            figure(
                "idle pod host PSS outside guest RAM",
                rest(ours),
                rest(big_tb),
                CONFIGS[2].0,
            ),
        ],
    )?;
    println!("cleanup: every pod removed; no shim, VM process, mount, cgroup or state left");
    Ok(())
}

/// Starts [`PODS`] pods, has each allocate and free [`ALLOC_MIB`], and
/// returns their settled memory; the pods are removed on every path.
fn after_alloc_and_free(k: &Kubelet, state_dir: &Path, label: &str) -> Result<IdleMemory> {
    let mut pods: Vec<Pod> = Vec::new();
    let measured = (|| -> Result<IdleMemory> {
        for i in 0..PODS {
            let pod = k.run_pod(&k.pod(&format!("density{i}")))?;
            pods.push(pod);
            let pod = pods.last().context("the pod just started")?;
            let id = k.run_container(pod, &ContainerBuilder::sleeper("sleeper"))?;
            k.sh_within(
                &id,
                &format!("dd if=/dev/zero of=/dev/null bs={ALLOC_MIB}M count=1 2>/dev/null"),
                DD_TIMEOUT,
            )?;
        }
        settle(label, || {
            pods.iter()
                .map(|pod| {
                    let vm_dir = state_dir.join(&pod.id);
                    podmem::pod_memory(
                        "containerd-shim-clh-v2",
                        &pod.id,
                        &pod.cgroup,
                        Some(&vm_dir),
                    )
                })
                .collect()
        })
    })();
    let removed = k.remove_pods(pods.iter());
    let measured = measured?;
    ensure!(removed.is_empty(), "removing the pods: {removed:#?}");
    Ok(measured)
}
