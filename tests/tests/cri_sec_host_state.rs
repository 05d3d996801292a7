//! What a pod's guest, or anyone else on the host, can learn from or do to
//! the host state the shim keeps for a VM, through CRI with the `clh`
//! handler and real VMs (issue 9, holes 3, 4, 5 and 8):
//!
//! - `sec_sock_01_vm_state_is_owner_only_and_no_socket_is_abstract`
//!   (SEC-SOCK-01/02): every directory the shim makes for a running pod is
//!   0700, every file and socket in it 0600 or stricter, all root's; none
//!   of the sockets the shim, the VMM, virtiofsd or the vsock bridge hold
//!   is abstract (reachable by any process in the host's network
//!   namespace, hostNetwork pods included); the shim's own API socket, in
//!   containerd's socket directory, is 0600.
//! - `rng_seed_is_on_no_command_line_and_credited_before_containers`: the
//!   seed that makes the guest's RNG unpredictable is nowhere a container
//!   or a host user can read it (the guest's /proc/cmdline, the VMM's argv,
//!   state.json), and the agent credited it before the first container.
//! - `a_console_flood_stays_under_the_cap`: guest root writing 1 MiB to
//!   its serial port leaves the host's console log under its configured
//!   64 KiB, keeps the newest output, and the VM keeps serving.
//! - `a_broken_configuration_starts_no_pod`: an out-of-range key fails
//!   RunPodSandbox with the file and key named, and leaves nothing.
//!
//! Each ends with the CRI and shim leak checks. Run one at a time
//! (`-- --test-threads=1`): each boots a VM.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet, BUSYBOX};
use clh_tests::ctr;

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// The console cap of the flood test, in KiB (the configuration key).
const CONSOLE_CAP_KIB: u64 = 64;
/// What the flood test writes to the guest's serial port.
const FLOOD_BYTES: u64 = 1 << 20;

/// The shim's configuration with `line` added to its `[guest]` table.
fn setup_with_guest_key(line: Option<&str>) -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    if let Some(line) = line {
        ctr::add_guest_key(&s.config, line).expect("the shim config");
    }
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, 60_000)
}

/// Every entry below `dir`, not descending into mount points (the pod's
/// rootfs and volumes are the containers' data, not the shim's state).
fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> Result<()> {
    let dev = std::fs::symlink_metadata(dir)?.dev();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let descend = meta.is_dir() && meta.dev() == dev && !is_mount_point(&path)?;
        out.push((path.clone(), meta));
        if descend {
            walk(&path, out)?;
        }
    }
    Ok(())
}

fn is_mount_point(path: &Path) -> Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let path = path.to_string_lossy();
    Ok(mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_ref())))
}

/// The pids of the processes serving the VM in `vm_dir` (the VMM,
/// virtiofsd, the vsock bridge: each names a socket in it) and the shims.
fn vm_processes(vm_dir: &Path) -> Result<Vec<(u32, String)>> {
    let vm_dir = vm_dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(argv) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        if argv.contains(&vm_dir) || argv.contains("containerd-shim-clh-v2") {
            found.push((pid, argv));
        }
    }
    Ok(found)
}

/// The inodes of the abstract Unix sockets on the host (`@name`).
fn abstract_socket_inodes() -> Result<Vec<String>> {
    let table = std::fs::read_to_string("/proc/net/unix")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[7].starts_with('@')).then(|| f[6].to_owned())
        })
        .collect())
}

/// SEC-SOCK-01/02: modes and owners of what the shim made for a running
/// pod, and no abstract socket among those its processes hold.
#[test]
fn sec_sock_01_vm_state_is_owner_only_and_no_socket_is_abstract() {
    let (s, cri) = setup_with_guest_key(None);
    owner_only(&s, &cri).unwrap();
}

fn owner_only(shim: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("modes"))?;
    let app = ContainerBuilder::new("app", BUSYBOX).command(&["sleep", "100000"]);
    let app = k.run_container(&pod, &app)?;
    k.sh_within(&app, "true", EXEC_TIMEOUT)?;

    let vm_dir = shim.state_dir.join(&pod.id);
    let mut entries = vec![(
        shim.state_dir.clone(),
        std::fs::symlink_metadata(&shim.state_dir)?,
    )];
    entries.push((vm_dir.clone(), std::fs::symlink_metadata(&vm_dir)?));
    walk(&vm_dir, &mut entries)?;
    let mut wrong = Vec::new();
    let mut sockets = 0;
    for (path, meta) in &entries {
        let mode = meta.permissions().mode() & 0o7777;
        let kind = meta.file_type();
        sockets += usize::from(kind.is_socket());
        // A mount point (a rootfs, a volume, the export) holds the pod's
        // data with the modes the image or the volume gives: it is
        // reachable only through the 0700 directories checked here.
        let bad = if kind.is_symlink() || is_mount_point(path)? {
            false
        } else if kind.is_dir() {
            mode != 0o700
        } else {
            mode & 0o077 != 0
        };
        if bad || meta.uid() != 0 {
            wrong.push(format!("{} {mode:o} uid {}", path.display(), meta.uid()));
        }
    }
    ensure!(
        sockets >= 2,
        "no VMM or vsock socket found in {}",
        vm_dir.display()
    );
    ensure!(
        wrong.is_empty(),
        "state readable or writable by others: {wrong:?}"
    );

    let abstract_inodes = abstract_socket_inodes()?;
    let processes = vm_processes(&vm_dir)?;
    ensure!(processes.len() >= 3, "the VM's processes: {processes:?}");
    // The shim's own API socket, in containerd's socket directory: 0600.
    let shim_sockets: Vec<&str> = processes
        .iter()
        .filter_map(|(_, argv)| argv.split(" -socket unix://").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    ensure!(!shim_sockets.is_empty(), "no shim socket in {processes:?}");
    for socket in shim_sockets {
        let meta = std::fs::symlink_metadata(socket)?;
        let mode = meta.permissions().mode() & 0o7777;
        ensure!(
            meta.file_type().is_socket() && mode == 0o600 && meta.uid() == 0,
            "the shim's socket {socket} is {mode:o}, uid {}",
            meta.uid()
        );
    }
    for (pid, argv) in &processes {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds {
            let target = std::fs::read_link(fd?.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                ensure!(
                    !abstract_inodes.iter().any(|a| a == inode),
                    "{argv} (pid {pid}) holds an abstract socket"
                );
            }
        }
    }
    k.remove_pod(&pod)?;
    k.finish()
}

/// Where containerd puts shim sockets, named by a sha256 of their address.
const SHIM_SOCKETS: &str = "/run/containerd/s/";

/// Runs of 32 or more hex digits in `text` once the `known` ids and shim
/// socket names are taken out: what a 128-bit or larger seed would look
/// like.
fn long_hex_runs(text: &str, known: &[&str]) -> Vec<String> {
    let mut text = text.to_owned();
    for id in known {
        text = text.replace(id, "");
    }
    let mut rest = text.as_str();
    let mut kept = String::new();
    while let Some(at) = rest.find(SHIM_SOCKETS) {
        kept.push_str(&rest[..at]);
        rest = rest[at + SHIM_SOCKETS.len()..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
    }
    kept.push_str(rest);
    kept.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|run| run.len() >= 32)
        .map(str::to_owned)
        .collect()
}

/// Hole 3: the RNG seed is on no command line and in no state file, and
/// the agent credited the host's entropy before the first container.
#[test]
fn rng_seed_is_on_no_command_line_and_credited_before_containers() {
    let (s, cri) = setup_with_guest_key(None);
    rng_seed(&s, &cri).unwrap();
}

fn rng_seed(shim: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("rng"))?;
    let app = ContainerBuilder::new("app", BUSYBOX).command(&["sleep", "100000"]);
    let app = k.run_container(&pod, &app)?;
    let vm_dir = shim.state_dir.join(&pod.id);
    let known = [pod.id.as_str(), app.as_str()];

    let mut places = vec![(
        "the guest's /proc/cmdline".to_owned(),
        k.sh_within(&app, "cat /proc/cmdline", EXEC_TIMEOUT)?,
    )];
    for (pid, argv) in vm_processes(&vm_dir)? {
        places.push((format!("the argv of pid {pid}"), argv));
    }
    let state = std::fs::read_to_string(vm_dir.join("state.json"))?;
    places.push(("state.json".to_owned(), state));
    ensure!(places.len() >= 4, "{places:?}");
    for (place, text) in &places {
        ensure!(
            !text.to_lowercase().contains("seed"),
            "{place} names a seed: {text}"
        );
        let runs = long_hex_runs(text, &known);
        ensure!(runs.is_empty(), "{place} holds {runs:?}: {text}");
    }

    // The agent's log line on the console, before the container's.
    let console = std::fs::read_to_string(vm_dir.join("console.log"))?;
    let seeded = console
        .find("host entropy credited")
        .context("the agent never credited host entropy (console log)")?;
    let line = console[seeded..].lines().next().unwrap_or_default();
    ensure!(
        line.contains("credited=64") && line.contains("crng_ready=true"),
        "{line}"
    );
    let created = console
        .find(&format!("id={app}"))
        .context("the agent's log of the container's creation (console log)")?;
    ensure!(
        seeded < created,
        "the RNG was seeded after the container was created"
    );
    let avail = k.sh_within(
        &app,
        "cat /proc/sys/kernel/random/entropy_avail",
        EXEC_TIMEOUT,
    )?;
    ensure!(avail.trim().parse::<u32>()? >= 256, "entropy_avail {avail}");
    k.remove_pod(&pod)?;
    k.finish()
}

/// Hole 4: guest root floods its serial console; the host's log stays
/// under the cap with the newest output kept, and the VM still serves.
#[test]
fn a_console_flood_stays_under_the_cap() {
    let (s, cri) = setup_with_guest_key(Some(&format!("console_log_max_kib = {CONSOLE_CAP_KIB}")));
    console_flood(&s, &cri).unwrap();
}

fn console_flood(shim: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("flood").privileged())?;
    let app = ContainerBuilder::new("app", BUSYBOX)
        .command(&["sleep", "100000"])
        .privileged();
    let app = k.run_container(&pod, &app)?;
    let log = shim.state_dir.join(&pod.id).join("console.log");
    let rotated = PathBuf::from(format!("{}.1", log.display()));

    // The guest's ttyS0 (4:64), which the kernel console and the VMM's
    // serial port are.
    let script = format!(
        "mknod /dev/serial0 c 4 64 && head -c {FLOOD_BYTES} /dev/zero | tr '\\0' x > /dev/serial0 \
         && echo END-OF-FLOOD > /dev/serial0"
    );
    k.sh_within(&app, &script, Duration::from_secs(300))?;
    k.cri()
        .wait_for("the flood's end in the console log", EXEC_TIMEOUT, |_| {
            let text = std::fs::read(&log)?;
            Ok(String::from_utf8_lossy(&text)
                .contains("END-OF-FLOOD")
                .then_some(()))
        })?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let kept = size(&log) + size(&rotated);
    ensure!(
        kept <= CONSOLE_CAP_KIB << 10,
        "the console log holds {kept} bytes, over the {CONSOLE_CAP_KIB} KiB cap"
    );
    ensure!(
        rotated.exists(),
        "no rotation after a {FLOOD_BYTES}-byte flood"
    );
    let alive = k.sh_within(&app, "echo alive", EXEC_TIMEOUT)?;
    ensure!(alive.trim() == "alive", "{alive}");
    k.remove_pod(&pod)?;
    k.finish()
}

/// Hole 8: a configuration the shim cannot use refuses the pod, naming
/// the file and the key, instead of running on defaults.
#[test]
fn a_broken_configuration_starts_no_pod() {
    let (s, cri) = setup_with_guest_key(Some("max_vcpus = 0"));
    broken_config(&s, &cri).unwrap();
}

fn broken_config(shim: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let k = Kubelet::start(setup)?;
    let err = match k.run_pod(&k.pod("broken")) {
        Ok(pod) => {
            k.remove_pod(&pod)?;
            anyhow::bail!("a pod started with guest.max_vcpus = 0");
        }
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("guest.max_vcpus"), "{err}");
    ensure!(
        err.contains(&shim.config.display().to_string()),
        "the error does not name {}: {err}",
        shim.config.display()
    );
    let left: Vec<_> = match std::fs::read_dir(&shim.state_dir) {
        Ok(dir) => dir.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    ensure!(left.is_empty(), "a refused pod left {left:?}");
    k.finish()
}
