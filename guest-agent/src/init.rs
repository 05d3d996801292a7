//! The PID 1 duties done once at boot, before serving: mounts, config,
//! logging, hostname, kernel modules. Each step names what it was
//! doing when it fails; the caller turns any failure into a power-off.

use crate::config::Config;
use crate::modules::{self, Loaded};
use crate::mounts::{self, Outcome, SysMounter};
use crate::{logging, sysinfo};
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
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
    if let Err(e) = mount_shared_dir() {
        warn!(
            "{e}; a VM restored from a template gets the device later, and its first \
             container mounts it"
        );
        SHARED_DIR_PENDING.store(true, Ordering::SeqCst);
    }
    Ok(config)
}

/// The shared directory was not mounted at boot: a template's VM has no
/// virtio-fs device, which is hot-plugged into each VM restored from it.
static SHARED_DIR_PENDING: AtomicBool = AtomicBool::new(false);
/// How long a container's creation waits for a just hot-plugged virtio-fs
/// device to register its tag (the host plugs it before the first
/// container; the driver's probe ends a moment later), and how often it
/// tries.
const SHARED_DIR_WAIT: Duration = Duration::from_secs(10);
const SHARED_DIR_RETRY: Duration = Duration::from_millis(50);

/// Mounts the shared directory if boot could not: a no-op once mounted,
/// and in host test mode (no init, nothing pending).
pub async fn ensure_shared_dir() -> anyhow::Result<()> {
    if !SHARED_DIR_PENDING.load(Ordering::SeqCst) {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + SHARED_DIR_WAIT;
    loop {
        match mount_shared_dir() {
            Ok(()) => {
                SHARED_DIR_PENDING.store(false, Ordering::SeqCst);
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context(format!("still failing after {SHARED_DIR_WAIT:?}")))
            }
            Err(_) => tokio::time::sleep(SHARED_DIR_RETRY).await,
        }
    }
}

/// Mounts the host's shared directory (container rootfses). Needs the
/// virtiofs module, so it comes after the modules. Without the device the
/// agent still serves (Check works; containers fail saying why), hence a
/// warning rather than a power-off.
fn mount_shared_dir() -> anyhow::Result<()> {
    use clh_agent_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
    std::fs::create_dir_all(GUEST_SHARED_DIR)
        .with_context(|| format!("cannot create {GUEST_SHARED_DIR}"))?;
    let none: Option<&str> = None;
    nix::mount::mount(
        Some(SHARED_FS_TAG),
        GUEST_SHARED_DIR,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        none,
    )
    .with_context(|| format!("cannot mount virtio-fs tag {SHARED_FS_TAG} on {GUEST_SHARED_DIR}"))?;
    info!("mounted virtio-fs {SHARED_FS_TAG} on {GUEST_SHARED_DIR}");
    Ok(())
}
