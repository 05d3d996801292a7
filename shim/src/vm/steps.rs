//! The host-side steps of a start that are not the sequence itself:
//! refusals, the directory, the RNG seed, sockets and processes.

use super::*;
use clh_hypervisor::VmSpec;

/// The kernel and initramfs exist: a missing one is the user's to fix
/// (build the image, or point the configuration at it), not the VMM's to
/// report in its own words.
pub(super) fn check_guest_image(opts: &VmOptions) -> Result<(), StartStep> {
    let kernel_key = match opts.backend {
        Backend::CloudHypervisor => "kernel",
        Backend::Qemu => "kernel_bzimage",
    };
    for (what, key, path) in [
        ("kernel", kernel_key, &opts.kernel),
        ("initramfs", "initramfs", &opts.initramfs),
    ] {
        if !path.is_file() {
            return Err(StartStep::MissingGuestFile {
                what,
                key,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

/// Creates `root` and `dir`, owner-only whatever the umask: `dir` holds
/// the VMM's API and vsock sockets.
pub(super) fn make_vm_dir(root: &Path, dir: &Path) -> Result<(), StartStep> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| StartStep::Io {
            action,
            path,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io("create the VM state root", root))?;
    // Not recursive: an existing directory means another VM or a
    // leftover, and must not be reused.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, Permissions::from_mode(0o700)))
        .map_err(io("create the VM directory", dir))
}

/// Sends the guest a fresh RNG seed over the agent connection and checks
/// that its CRNG is initialised, before any container can start. Not on
/// the kernel command line: the guest's /proc/cmdline is readable by every
/// container, and the host's by every process (QEMU's argv).
pub(super) async fn seed_guest_rng(agent: &AgentClient) -> Result<(), StartStep> {
    let seed = random_seed()?;
    let reply = agent.seed_random(&seed).await.map_err(StartStep::Agent)?;
    if !reply.crng_ready {
        return Err(StartStep::RngNotReady {
            credited: reply.credited_bytes,
            entropy_avail: reply.entropy_avail,
        });
    }
    tracing::debug!(
        credited = reply.credited_bytes,
        entropy_avail = reply.entropy_avail,
        "guest RNG seeded"
    );
    Ok(())
}

/// The kernel command line: serial console, reboot on panic (the VMM then
/// exits and the shim notices), then the configured extra parameters.
/// Nothing secret: the guest's containers read it in /proc/cmdline, and it
/// is in QEMU's argv on the host. The RNG seed goes over vsock instead
/// ([`seed_guest_rng`]).
pub(super) fn kernel_cmdline(opts: &VmOptions) -> String {
    let mut params = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
    params.push(if opts.debug { "clh.debug" } else { "quiet" }.to_string());
    params.extend(opts.extra_kernel_params.iter().cloned());
    params.join(" ")
}

/// The VM `id` in `dir` as `opts` describe it, without the per-pod
/// devices (virtio-fs, NICs) that the start adds once they exist. A
/// template is keyed by what this holds (`template::make_ahead` builds
/// the same).
pub(super) fn vm_spec(id: &str, dir: &Path, opts: &VmOptions) -> VmSpec {
    VmSpec {
        id: id.to_string(),
        dir: dir.to_path_buf(),
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        max: opts.max,
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        cmdline: kernel_cmdline(opts),
        shared_fs: None,
        console_log: dir.join("console.log"),
        console_log_max_bytes: opts.console_log_max_bytes,
        free_page_reporting: opts.free_page_reporting,
        tcg_tb_size_mib: opts.tcg_tb_size_mib,
        restore_from: None,
        start_timeout: opts.vmm_start_timeout,
        netns: None,
        nics: Vec::new(),
    }
}

/// 64 random bytes (512 bits, twice the kernel pool's 256), read from
/// /dev/urandom, which is the getrandom(2) pool without a new dependency.
pub(super) fn random_seed() -> Result<[u8; 64], StartStep> {
    let mut bytes = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(StartStep::Seed)?;
    Ok(bytes)
}

/// Makes the sockets the VMM and its helpers bound directly in `dir`
/// owner-only (0600), as the shim's own files are. They bind with the
/// shim's umask (077), so they are at most 0700 already, and `dir` is 0700;
/// this makes their mode say so on its own. Only `dir`'s own entries:
/// `shared/` and `private/` are the guest's view and are never walked.
pub(super) fn restrict_sockets(dir: &Path) -> Result<(), StartStep> {
    use std::os::unix::fs::FileTypeExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StartStep::Io {
            action: "make the VM's sockets owner-only in",
            path,
            source,
        }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        // file_type() does not follow links: a symlink is left alone.
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let path = entry.path();
            std::fs::set_permissions(&path, Permissions::from_mode(0o600)).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub(crate) fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

/// `pids` and every process they forked (virtiofsd's sandboxed worker was
/// born before its parent joined the pod cgroup, so it does not follow).
pub(super) fn with_descendants(pids: Vec<u32>) -> Vec<u32> {
    let mut all = Vec::new();
    let mut todo = pids;
    while let Some(pid) = todo.pop() {
        if all.contains(&pid) {
            continue;
        }
        all.push(pid);
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all
}
