//! Shared setup for the `ctr run --runtime io.containerd.clh.v2` end-to-end
//! tests: the built shim, a shim config pointing at QEMU and the guest
//! image, a private containerd with busybox imported, and the leak checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::containerd::{ContainerdVersion, PrivateContainerd};
use crate::cri::CriSetup;
use crate::GuestImage;

pub const BUSYBOX: &str = "docker.io/library/busybox:latest";
pub const RUNTIME: &str = "io.containerd.clh.v2";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shim binary's directory: builds it (`cargo build -p
/// containerd-shim-clh-v2`, cheap when fresh) into target/debug.
pub fn shim_dir() -> Result<PathBuf> {
    built_shim_dir(false)
}

/// The release shim's directory, as a benchmark should run it: builds it
/// (cheap when fresh) into target/release.
pub fn release_shim_dir() -> Result<PathBuf> {
    built_shim_dir(true)
}

fn built_shim_dir(release: bool) -> Result<PathBuf> {
    built_binary("containerd-shim-clh-v2", "containerd-shim-clh-v2", release)
        .map(|bin| bin.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Builds `package` (cheap when fresh) and returns its binary `name` in
/// target/debug (target/release when `release`).
pub fn built_binary(package: &str, name: &str, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["build", "-q", "-p", package];
    if release {
        args.push("--release");
    }
    let status = Command::new(cargo)
        .args(&args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    ensure!(bin.is_file(), "cargo built no {}", bin.display());
    Ok(bin)
}

/// The `clh` CRI handler as tests/tests/cri_clh.rs and the CRI bench run
/// it: the shim from `shim_dir` with `s`'s config, whose agent deadline is
/// raised to `agent_connect_ms` (several TCG boots at once on a small host
/// take far longer than one), CRI calls bounded by 180 s, and the shim's
/// state dir among the leak checks. `images_dir`: the caller's
/// `CARGO_TARGET_TMPDIR`.
pub fn cri_setup(
    s: &Setup,
    shim_dir: PathBuf,
    images_dir: &Path,
    agent_connect_ms: u64,
) -> Result<CriSetup> {
    set_timeout(&s.config, "agent_connect_ms", agent_connect_ms)?;
    let mut cri = CriSetup::new("clh", images_dir);
    cri.shim_dir = Some(shim_dir);
    cri.env = vec![("CLH_SHIM_CONFIG".into(), s.config.display().to_string())];
    cri.timeout = Duration::from_secs(180);
    let state = s.state_dir.clone();
    cri.extra_leaks = Some(Arc::new(move |_| state_dir_leaks(&state)));
    let state = s.state_dir.clone();
    cri.failure_report = Some(Arc::new(move || vm_log_tails(&state, 40)));
    Ok(cri)
}

/// Sets `[timeouts] key = ms` in the shim config at `config`, in its one
/// `[timeouts]` table (faults::setup writes one) or a new one.
pub fn set_timeout(config: &Path, key: &str, ms: u64) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let table = "\n[timeouts]\n";
    let with_key = format!("{table}{key} = {ms}\n");
    let text = match text.find(table) {
        Some(_) => text.replacen(table, &with_key, 1),
        None => text + &with_key,
    };
    std::fs::write(config, text).with_context(|| format!("writing {}", config.display()))
}

/// The last `lines` lines of every log of every VM under `state_dir`: the
/// guest console (kernel and agent), the VMM's, virtiofsd's, the vsock
/// device's.
pub fn vm_log_tails(state_dir: &Path, lines: usize) -> String {
    let mut report = String::new();
    for vm in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let Ok(log) = std::fs::read_to_string(&path) else {
                continue;
            };
            let all: Vec<&str> = log.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            report.push_str(&format!(
                "{} (last {lines} lines):\n{tail}\n",
                path.display()
            ));
        }
    }
    report
}

/// [`cri_test_setup`] of a fresh [`setup`] with a 60 s agent deadline. Keep
/// the returned [`Setup`] alive: it owns the state directories.
pub fn default_cri_test_setup(images_dir: &Path) -> (Setup, CriSetup) {
    let s = setup().expect("shim setup");
    cri_test_setup(s, images_dir, 60_000)
}

/// [`cri_setup`] for an end-to-end test: the debug shim (built if need
/// be), images under `images_dir` (the test's `CARGO_TARGET_TMPDIR`).
/// Panics on failure, naming what failed.
pub fn cri_test_setup(s: Setup, images_dir: &Path, agent_connect_ms: u64) -> (Setup, CriSetup) {
    let shim_dir = shim_dir().expect("building the shim");
    let cri = cri_setup(&s, shim_dir, images_dir, agent_connect_ms).expect("CRI setup");
    (s, cri)
}

/// A shim config: QEMU, the built guest image, a short state dir.
pub struct Setup {
    _tmp: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub image: GuestImage,
}

pub fn setup() -> Result<Setup> {
    let image = GuestImage::locate()?;
    let tmp = tempfile::Builder::new().prefix("clh-").tempdir_in("/tmp")?;
    let state_dir = tmp.path().join("s");
    let config = tmp.path().join("clh-shim.toml");
    write_shim_config(&config, &state_dir, &image)?;
    Ok(Setup {
        _tmp: tmp,
        config,
        state_dir,
        image,
    })
}

/// The busybox OCI tarball, built once into `tmpdir` (pass the test's
/// `CARGO_TARGET_TMPDIR`, which only integration tests see).
pub fn busybox_tar(tmpdir: &Path) -> Result<PathBuf> {
    let tar = tmpdir.join("ctr-run-busybox.tar");
    if !tar.is_file() {
        let script = workspace().join("tests/images/build-busybox-image.sh");
        let status = Command::new(script).arg(&tar).status()?;
        ensure!(status.success(), "build-busybox-image.sh failed: {status}");
    }
    Ok(tar)
}

/// Writes the shim's config to `path`: QEMU, the built guest image, and
/// `state_dir` (short: sockets live below it).
pub fn write_shim_config(path: &Path, state_dir: &Path, image: &GuestImage) -> Result<()> {
    let bins = crate::binaries();
    std::fs::write(
        path,
        format!(
            "[hypervisor]\nbackend = \"qemu\"\nqemu = \"{}\"\nvirtiofsd = \"{}\"\nvhost_device_vsock = \"{}\"\n\n[guest]\nkernel = \"{}\"\nkernel_bzimage = \"{}\"\ninitramfs = \"{}\"\n\n[runtime]\nstate_dir = \"{}\"\n",
            bins.qemu.display(),
            bins.virtiofsd.display(),
            bins.vhost_device_vsock.display(),
            image.vmlinux.display(),
            image.vmlinuz.display(),
            image.initramfs.display(),
            state_dir.display()
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// Adds `line` (`key = value`) to the `[guest]` table of the shim
/// configuration `config` that [`write_shim_config`] wrote. A shim reads
/// its configuration when it starts: pods started afterwards see it.
pub fn add_guest_key(config: &Path, line: &str) -> Result<()> {
    add_key(config, "guest", line)
}

/// [`add_guest_key`] for any table; an empty `line` adds nothing.
pub fn add_key(config: &Path, table: &str, line: &str) -> Result<()> {
    if line.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("reading the shim config {}", config.display()))?;
    let text = with_key(&text, table, line)?;
    std::fs::write(config, text)
        .with_context(|| format!("writing the shim config {}", config.display()))
}

/// Config `text` with `line` added at the top of `[table]`, which must be
/// there.
pub fn with_key(text: &str, table: &str, line: &str) -> Result<String> {
    let header = format!("[{table}]\n");
    ensure!(text.contains(&header), "no {header} table in {text}");
    Ok(text.replacen(&header, &format!("{header}{line}\n"), 1))
}

/// A private containerd that runs our shim with `s`'s config, busybox
/// imported.
pub fn start(version: ContainerdVersion, s: &Setup, tmpdir: &Path) -> Result<PrivateContainerd> {
    let config = s.config.display().to_string();
    let ctd = PrivateContainerd::start_with_env(
        version,
        Some(&shim_dir()?),
        &[("CLH_SHIM_CONFIG", &config)],
    )?;
    ctd.import_image(&busybox_tar(tmpdir)?, BUSYBOX)?;
    Ok(ctd)
}

/// A busybox rootfs in `dir` (for `ctr run --rootfs` or a container spec
/// of our own): the directories `subdirs`, `bin/busybox` from the cache
/// that packaging/install-containerd.sh fills, and `bin/<applet>` links.
pub fn busybox_rootfs(dir: &Path, subdirs: &[&str], applets: &[&str]) -> Result<()> {
    for sub in subdirs.iter().chain(&["bin"]) {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let busybox = crate::containerd::cache_dir().join("busybox-static/bin/busybox");
    ensure!(
        busybox.is_file(),
        "{} is missing: run packaging/install-containerd.sh first",
        busybox.display()
    );
    std::fs::copy(&busybox, dir.join("bin/busybox")).context("copying busybox")?;
    for applet in applets {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    Ok(())
}

/// `ctr run --runtime clh --rm busybox args...`.
pub fn run(ctd: &PrivateContainerd, args: &[&str]) -> Result<std::process::Output> {
    let mut full = vec!["run", "--runtime", RUNTIME, "--rm", BUSYBOX];
    full.extend_from_slice(args);
    ctd.ctr(&full)
}

/// The guest boot id container `id` sees (`ctr task exec`).
pub fn boot_id(ctd: &PrivateContainerd, id: &str) -> Result<String> {
    let out = ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "boot",
        id,
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ])?;
    crate::containerd::check(&out, "ctr task exec cat boot_id")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `ctr run -d --runtime clh busybox ID sleep 1000`, checked: a container
/// that runs until the test stops it.
pub fn run_sleeper(ctd: &PrivateContainerd, id: &str) -> Result<()> {
    let out = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sleep",
        "1000",
    ])?;
    crate::containerd::check(&out, "ctr run -d")
}

/// Nothing of ours is left: containerd's report, and the shim's state dir
/// empty, no VM process naming it, no mount under it.
pub fn assert_no_leaks(ctd: &PrivateContainerd, state_dir: &Path) {
    let leaks = leaks(ctd, state_dir);
    assert!(leaks.is_empty(), "leaks: {leaks:#?}");
}

/// [`assert_no_leaks`] once asynchronous cleanup (a killed shim's children
/// dying of PR_SET_PDEATHSIG, containerd's `delete`) had `settle` to finish.
pub fn assert_no_leaks_within(ctd: &PrivateContainerd, state_dir: &Path, settle: Duration) {
    let deadline = Instant::now() + settle;
    while !leaks(ctd, state_dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_no_leaks(ctd, state_dir);
}

pub fn leaks(ctd: &PrivateContainerd, state_dir: &Path) -> Vec<String> {
    let mut leaks = ctd.leak_report();
    leaks.extend(state_dir_leaks(state_dir));
    leaks
}

/// The shim's own leftovers: entries in its state dir, processes naming
/// it, mounts under it (also a CRI test's `CriSetup::extra_leaks`).
pub fn state_dir_leaks(state_dir: &Path) -> Vec<String> {
    let mut leaks = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        leaks.extend(
            entries
                .flatten()
                .map(|e| format!("state {}", e.path().display())),
        );
    }
    let needle = state_dir.display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            leaks.push(format!(
                "process {}: {}",
                entry.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    leaks.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| format!("mount {l}")),
    );
    leaks
}

/// Pids whose command line starts with `program` (e.g.
/// `qemu-system-x86_64`, `virtiofsd`) and names the VM directory `vm_dir`.
pub fn vm_processes(program: &str, vm_dir: &Path) -> Vec<i32> {
    let dir = vm_dir.display().to_string();
    crate::containerd::all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = crate::containerd::cmdline(pid);
            args.first().is_some_and(|a| a.ends_with(program))
                && args.iter().any(|a| a.contains(&dir))
        })
        .collect()
}

/// SIGKILLs task `id`, waits for it to stop (within [`VM_DEADLINE`]), then
/// deletes the task and the container, each checked.
pub fn kill_and_remove(ctd: &PrivateContainerd, id: &str) -> Result<()> {
    crate::containerd::check(
        &ctd.ctr(&["task", "kill", "-s", "SIGKILL", id])?,
        "ctr task kill",
    )?;
    wait_status(ctd, id, "STOPPED", VM_DEADLINE)?;
    crate::containerd::check(&ctd.ctr(&["task", "delete", id])?, "ctr task delete")?;
    crate::containerd::check(
        &ctd.ctr(&["container", "delete", id])?,
        "ctr container delete",
    )
}

/// Polls `ctr task ls` until `id`'s line contains `status` (e.g. STOPPED).
pub fn wait_status(
    ctd: &PrivateContainerd,
    id: &str,
    status: &str,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = ctd.ctr(&["task", "ls"])?;
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        if listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
        {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{id} never {status}: {listing}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A VM boot under TCG takes 5–10 s; leave room for a loaded host.
pub const VM_DEADLINE: Duration = Duration::from_secs(90);

/// `ctr` with our address and namespace, to spawn rather than run to
/// completion; `run` gets the same private fifo dir `ctd.ctr` gives it.
pub fn ctr_command(ctd: &PrivateContainerd, args: &[&str]) -> Command {
    let mut cmd = Command::new(ctd.version().bin_dir().join("ctr"));
    cmd.arg("--address")
        .arg(ctd.address())
        .args(["--namespace", ctd.namespace()]);
    if args.first() == Some(&"run") {
        cmd.arg("run").arg("--fifo-dir").arg(ctd.dir().join("fifo"));
        cmd.args(&args[1..]);
    } else {
        cmd.args(args);
    }
    cmd
}

/// Waits for `child` to exit, killing it past `within`.
pub fn wait_within(child: &mut Child, within: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("ctr did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn finish(mut ctd: PrivateContainerd, s: &Setup) -> Result<()> {
    ctd.stop()?;
    // virtiofsd's sandboxed child was once seen exiting just after the shim.
    assert_no_leaks_within(&ctd, &s.state_dir, Duration::from_secs(5));
    Ok(())
}
