//! `make demo` (for now): boot one pod VM the way the shim does, from a
//! configuration file, talk to its agent, stop it, and show that nothing is
//! left behind.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clh_config::Config;
use containerd_shim_clh_v2::check::backend_name;
use containerd_shim_clh_v2::host::KvmFlavour;
use containerd_shim_clh_v2::vm::{PodVm, VmOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, flag, path] = args.as_slice() else {
        bail!("usage: vm-demo --config FILE");
    };
    if flag != "--config" {
        bail!("usage: vm-demo --config FILE");
    }
    let config = Config::load(&PathBuf::from(path))?;
    let (options, reason) = VmOptions::from_config(&config, &KvmFlavour::detect());
    println!("backend: {} ({reason})", backend_name(options.backend));

    let root = config.runtime.state_dir.clone();
    let started = Instant::now();
    let vm = PodVm::start("demo", &root, &options)
        .await
        .context("the demo VM did not start")?;
    let version = vm.agent().version().await?;
    let check = vm.agent().check().await?;
    println!(
        "agent answered {} ms after spawn (protocol {}, clh-agent {})",
        started.elapsed().as_millis(),
        version.protocol_version,
        version.agent_version
    );
    println!("guest kernel:  {}", check.kernel_release);
    println!(
        "host kernel:   {}",
        nix::sys::utsname::uname()?.release().to_string_lossy()
    );
    println!("guest boot id: {}", check.boot_id);
    println!(
        "guest memory:  {} MiB, agent RSS {} KiB",
        check.mem_total_kib / 1024,
        check.agent_rss_kib
    );
    let dir = vm.dir().to_path_buf();
    let pids = vm.pids();
    vm.stop().await?;
    let alive: Vec<u32> = pids
        .into_iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    if dir.exists() || !alive.is_empty() {
        bail!(
            "left behind: dir exists = {}, live pids = {alive:?}",
            dir.exists()
        );
    }
    println!("stopped: VM, virtiofsd and their sockets are gone");
    Ok(())
}
