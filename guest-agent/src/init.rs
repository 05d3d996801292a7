//! The PID 1 duties done once at boot, before serving: mounts, config,
//! logging, hostname, kernel modules. Each step names what it was
//! doing when it fails; the caller turns any failure into a power-off.

use crate::config::Config;
use crate::modules::{self, Loaded};
use crate::mounts::{self, Outcome, SysMounter};
use crate::{logging, sysinfo};
use anyhow::Context;
use tracing::{debug, info, warn};

/// Runs the boot steps and returns the configuration for the rest.
pub fn init() -> anyhow::Result<Config> {
    // Mount first: the configuration lives in /proc/cmdline. Logging waits
    // for the configuration (its level), so mount outcomes are logged after.
    let mounted = mounts::mount_all(&mut SysMounter, mounts::BASE_MOUNTS)
        .context("mounting base filesystems")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let config = Config::from_cmdline(&cmdline)?;

    logging::init(config.log_level);
    info!(
        version = crate::service::AGENT_VERSION,
        "clh-agent starting as init"
    );
    for warning in &config.warnings {
        warn!("{warning}");
    }
    for outcome in mounted {
        match outcome {
            Outcome::Mounted(target) => debug!("mounted {target}"),
            Outcome::AlreadyMounted(target) => debug!("{target} already mounted"),
        }
    }

    nix::unistd::sethostname(&config.hostname)
        .with_context(|| format!("setting hostname to {:?}", config.hostname))?;
    debug!("hostname {}", config.hostname);

    // The host's RNG seed arrives over vsock (SeedRandom), before the
    // first container: never on the command line, which every container
    // can read in /proc/cmdline.

    let release = sysinfo::kernel_release()?;
    let loaded = modules::load_all(&release, &config.params).context("loading kernel modules")?;
    let mut names = Vec::with_capacity(loaded.len());
    for module in loaded {
        match module {
            Loaded::Loaded { name, params } if params.is_empty() => names.push(name),
            Loaded::Loaded { name, params } => names.push(format!("{name}({params})")),
            Loaded::AlreadyLoaded { name } => debug!("module {name} already loaded"),
        }
    }
    info!(kernel = %release, "loaded modules: {}", names.join(" "));
    mount_shared_dir();
    Ok(config)
}

/// Mounts the host's shared directory (container rootfses). Needs the
/// virtiofs module, so it comes after the modules. Without the device the
/// agent still serves (Check works; containers fail saying why), hence a
/// warning rather than a power-off.
fn mount_shared_dir() {
    use clh_agent_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
    if let Err(e) = std::fs::create_dir_all(GUEST_SHARED_DIR) {
        warn!("cannot create {GUEST_SHARED_DIR}: {e}");
        return;
    }
    let none: Option<&str> = None;
    match nix::mount::mount(
        Some(SHARED_FS_TAG),
        GUEST_SHARED_DIR,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        none,
    ) {
        Ok(()) => info!("mounted virtio-fs {SHARED_FS_TAG} on {GUEST_SHARED_DIR}"),
        Err(e) => warn!(
            "cannot mount virtio-fs tag {SHARED_FS_TAG} on {GUEST_SHARED_DIR}: {e}; \
             containers will not find their rootfs"
        ),
    }
}
