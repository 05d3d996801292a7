//! Pod volumes through CRI with the `clh` handler, and shared-directory
//! security tests of ../shared/reference/SECURITY-AND-RELIABILITY.md (what
//! a malicious guest can send virtiofsd directly is tested with raw FUSE
//! requests in tests/tests/virtiofsd_raw_fuse.rs):
//!
//! - read-write hostPath (reads the host's file, its write lands on the
//!   host); read-only hostPath (the container's write fails; the bind is
//!   read-only on the host side too, see bind_mount.rs); subPath of a
//!   directory and of a single file; `emptyDir` with medium Memory, shared
//!   by two containers in guest RAM and never reaching the host's tmpfs;
//!   a volume that only the pod's second container, created later, mounts.
//! - a host canary mount survives the pod's teardown (SEC-FS-02's
//!   criterion; the swap itself is refused by the read-only export).
//! - SEC-FS-08: hostPath through `..` or a symlinked component into the
//!   host's /proc or /sys is refused (at StartContainer, where containerd
//!   creates the task).
//!
//! - SEC-FS-08 (recursive binds): hostPath `/` and `/run` reach the
//!   container without the host's /proc, /sys and /dev, without kernel
//!   filesystems mounted elsewhere, without the mounts in the shim's state
//!   directory, and without what the host mounts below them later; a host
//!   canary file and an ordinary submount are there.
//! - SEC-FS-09: a privileged pod's container sees the guest's devices, not
//!   the host's (`privileged_without_host_devices` in packaging/containerd).
//!
//! - a ConfigMap volume updated by the kubelet's atomic writer: the
//!   container sees the whole new set and its inotify watch fires, within
//!   1 s (volume_sync.rs copies such volumes into the guest).
//!
//! Every test ends with the CRI and shim leak checks (no mount left,
//! failed creates included).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clh_tests::atomic_writer::{atomic_write, build_inotify_wait};
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet, BUSYBOX};
use clh_tests::ctr;
use clh_tests::templates::{self, RestoreWatch};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, 30_000)
}

/// A filesystem mounted at `path` for the test's life (a kubelet's memory
/// emptyDir, a canary, a kernel filesystem outside /proc), unmounted on
/// drop.
struct HostMount(PathBuf);

impl HostMount {
    fn tmpfs(path: &Path) -> Result<Self> {
        Self::of_type("tmpfs", path)
    }

    fn of_type(fstype: &str, path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        mount(
            Some(fstype),
            path,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a {fstype} at {}", path.display()))?;
        Ok(HostMount(path.to_path_buf()))
    }

    fn is_mounted(&self) -> bool {
        let needle = format!(" {} ", self.0.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&needle))
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn volumes_and_escapes() {
    let (_s, cri) = setup();
    volumes(&cri).unwrap();
}

/// The same with the pod's VM restored from a template: its virtio-fs is
/// hot-plugged after the restore.
#[test]
fn volumes_in_a_vm_restored_from_a_template() {
    let s = ctr::setup().expect("shim setup");
    let _store = templates::enable(&s).expect("templates on");
    let watch = RestoreWatch::start(&s.state_dir);
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (_s, cri) = ctr::cri_test_setup(s, images, 30_000);
    volumes(&cri).unwrap();
    watch.all_restored(1).unwrap();
}

fn volumes(setup: &CriSetup) -> Result<()> {
    let host = tempfile::Builder::new().prefix("vol-").tempdir_in("/tmp")?;
    let h = host.path();
    for dir in ["rw", "ro", "sub/deep", "late"] {
        std::fs::create_dir_all(h.join(dir))?;
    }
    std::fs::write(h.join("rw/in"), "from the host\n")?;
    std::fs::write(h.join("ro/f"), "original\n")?;
    std::fs::write(h.join("sub/deep/file.txt"), "deep\n")?;
    std::fs::write(h.join("single.conf"), "key=value\n")?;
    std::fs::write(h.join("late/file"), "late\n")?;
    let cache = HostMount::tmpfs(&h.join("pod/volumes/kubernetes.io~empty-dir/cache"))?;
    let canary = HostMount::tmpfs(&h.join("canary"))?;

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("vols"))?;
    let app = ContainerBuilder::new("app", BUSYBOX)
        .command(&["sleep", "100000"])
        .mount(s(&h.join("rw")), "/rw", false)
        .mount(s(&h.join("ro")), "/ro", true)
        .mount(s(&h.join("sub/deep")), "/deep", false)
        .mount(s(&h.join("single.conf")), "/etc/single.conf", true)
        .mount(s(&cache.0), "/cache", false);
    let app = k.run_container(&pod, &app)?;
    let out = k.sh(&app, "cat /rw/in /deep/file.txt /etc/single.conf")?;
    ensure!(out == "from the host\ndeep\nkey=value\n", "{out:?}");
    k.sh(&app, "echo written > /rw/out")?;
    ensure!(std::fs::read_to_string(h.join("rw/out"))? == "written\n");
    let ro = k.sh(&app, "echo x > /ro/f && echo WRITABLE || echo refused")?;
    ensure!(ro == "refused\n", "read-only volume: {ro:?}");
    // The memory emptyDir is guest RAM, not the share, not the host.
    k.sh(&app, "echo in-memory > /cache/x")?;
    let fstype = k.sh(&app, "awk '$2 == \"/cache\" {print $3}' /proc/mounts")?;
    ensure!(fstype.trim() != "virtiofs", "/cache is {fstype:?}");
    ensure!(
        std::fs::read_dir(&cache.0)?.next().is_none(),
        "a memory volume reached the host"
    );

    // A second container, created after the VM started, with its own new
    // volume and the shared memory volume.
    let late = ContainerBuilder::new("late", BUSYBOX)
        .command(&["sleep", "100000"])
        .mount(s(&h.join("late")), "/late", true)
        .mount(s(&cache.0), "/cache", false);
    let late = k.run_container(&pod, &late)?;
    let out = k.sh(&late, "cat /late/file /cache/x")?;
    ensure!(out == "late\nin-memory\n", "{out:?}");

    // SEC-FS-08: host paths into the host's kernel trees are refused.
    std::os::unix::fs::symlink("/", h.join("evil"))?;
    for (n, (bad, tree)) in [
        (format!("{}/../../proc", s(h)), "/proc"),
        (format!("{}/evil/sys", s(h)), "/sys"),
    ]
    .into_iter()
    .enumerate()
    {
        let c = ContainerBuilder::new(&format!("escape-{n}"), BUSYBOX)
            .command(&["true"])
            .mount(&bad, "/host", true);
        // containerd's CRI creates the task, hence our Create, at
        // StartContainer.
        let err = match k.run_container(&pod, &c) {
            Ok(id) => anyhow::bail!("{bad} was mounted (container {id})"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains(tree), "{bad}: {err}");
    }

    k.remove_pod(&pod)?;
    ensure!(canary.is_mounted(), "the host canary mount is gone");
    ensure!(std::fs::read_to_string(h.join("ro/f"))? == "original\n");
    k.finish()
}

/// A random hex string: a canary no one else writes.
fn secret() -> Result<String> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The paths of `paths` that exist in container `id`.
fn existing(k: &Kubelet, id: &str, paths: &[String]) -> Result<Vec<String>> {
    let script = format!(
        "for p in {}; do [ -e \"$p\" ] && echo \"$p\"; done; true",
        paths.join(" ")
    );
    Ok(k.sh(id, &script)?.lines().map(str::to_owned).collect())
}

/// SEC-FS-08 for recursive binds (CRI hostPaths are `rbind`): hostPath `/`
/// and `/run` mounted into a container. The host's kernel trees, a proc
/// mounted under /run, the pod's own rootfs mount in the shim's state
/// directory, and a proc the host mounts under `/` after the container
/// started are all absent; a canary file, an ordinary tmpfs submount of
/// `/` and one of `/run` are there, so the binds themselves work.
#[test]
fn sec_fs_08_host_path_root_and_run_carry_no_host_kernel_or_runtime_mounts() {
    let (s, cri) = setup();
    host_path_root(&s, &cri).unwrap();
}

fn host_path_root(shim: &ctr::Setup, setup: &CriSetup) -> Result<()> {
    let secret = secret()?;
    let tmp = tempfile::Builder::new()
        .prefix("sec-fs-08-")
        .tempdir_in("/tmp")?;
    let run = tempfile::Builder::new()
        .prefix("sec-fs-08-")
        .tempdir_in("/run")?;
    let (t, r) = (s(tmp.path()), s(run.path()));
    std::fs::write(tmp.path().join("secret"), &secret)?;
    let sub = HostMount::tmpfs(&tmp.path().join("sub"))?;
    std::fs::write(sub.0.join("file"), format!("{secret}-sub"))?;
    let run_sub = HostMount::tmpfs(&run.path().join("tmp"))?;
    std::fs::write(run_sub.0.join("file"), format!("{secret}-run"))?;
    let _run_proc = HostMount::of_type("proc", &run.path().join("proc"))?;

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("hostroot"))?;
    let app = ContainerBuilder::new("app", BUSYBOX)
        .command(&["sleep", "100000"])
        .mount("/", "/host", true)
        .mount("/run", "/hostrun", true);
    let app = k.run_container(&pod, &app)?;
    // Mounted on the host after the container started, below `/`.
    let late = HostMount::of_type("proc", &tmp.path().join("late"))?;

    let seen = k.sh(
        &app,
        &format!(
            "cat /host{t}/secret /host{t}/sub/file /hostrun{}/tmp/file",
            &r[4..]
        ),
    )?;
    ensure!(
        seen == format!("{secret}{secret}-sub{secret}-run"),
        "the binds do not show the host's files: {seen:?}"
    );
    let vm_dir = format!("/host{}/{}", s(&shim.state_dir), pod.id);
    let absent = [
        "/host/proc/1/cmdline".to_string(),
        "/host/proc/self".into(),
        "/host/sys/kernel".into(),
        "/host/sys/fs/cgroup/memory".into(),
        "/host/dev/null".into(),
        "/host/dev/kvm".into(),
        "/host/dev/vda".into(),
        format!("/hostrun{}/proc/1", &r[4..]),
        format!("/host{r}/proc/1"),
        format!("/host{t}/late/1"),
        format!("{vm_dir}/private/{app}/rootfs/bin"),
        format!("{vm_dir}/shared/{app}"),
    ];
    let leaked = existing(&k, &app, &absent)?;
    drop(late);
    ensure!(
        leaked.is_empty(),
        "host trees reached the container: {leaked:?}"
    );

    k.remove_pod(&pod)?;
    k.finish()
}

/// SEC-FS-09: a privileged container (in a privileged pod) on `clh` has
/// every capability in its VM, but its /dev holds only the guest's
/// devices: none of the host's device nodes (kvm, vda, loop*, tty*, ...)
/// that containerd would list in the spec without
/// `privileged_without_host_devices`.
#[test]
fn sec_fs_09_privileged_no_host_devices() {
    let (_s, cri) = setup();
    privileged(&cri).unwrap();
}

fn privileged(setup: &CriSetup) -> Result<()> {
    /// What a container's /dev holds without any device of the spec.
    const CONTAINER_DEV: &[&str] = &[
        "console", "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
        "stderr", "stdin", "stdout", "tty", "urandom", "zero",
    ];
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("priv").privileged())?;
    let app = ContainerBuilder::new("app", BUSYBOX)
        .command(&["sleep", "100000"])
        .privileged();
    let app = k.run_container(&pod, &app)?;
    let caps = k.sh(&app, "grep CapEff /proc/self/status")?;
    // All capabilities the host gives (CAP_SYS_RESOURCE may be missing here).
    ensure!(caps.contains("000001ff"), "not privileged: {caps:?}");
    let dev = k.sh(&app, "ls /dev")?;
    let host: Vec<String> = std::fs::read_dir("/dev")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let leaked: Vec<&str> = dev
        .split_whitespace()
        .filter(|d| !CONTAINER_DEV.contains(d) && host.iter().any(|h| h == d))
        .collect();
    ensure!(
        leaked.is_empty(),
        "host devices in the privileged container: {leaked:?} (all of /dev: {dev:?})"
    );
    k.remove_pod(&pod)?;
    k.finish()
}

/// The kubelet's atomic update of a ConfigMap volume: the container sees
/// the whole new set, and an inotify watch in it fires, within 1 s (the
/// latency is measured on the guest's clock, from just before the update
/// to the event, so it is an upper bound).
#[test]
fn configmap_update_reaches_the_container_within_a_second() {
    let (_s, cri) = setup();
    configmap_update(&cri).unwrap();
}

fn configmap_update(setup: &CriSetup) -> Result<()> {
    let host = tempfile::Builder::new().prefix("cm-").tempdir_in("/tmp")?;
    let cm = host.path().join("volumes/kubernetes.io~configmap/cfg");
    std::fs::create_dir_all(&cm)?;
    atomic_write(&cm, 1, &[("a", b"1"), ("b", b"1"), ("gone", b"x")])?;
    let watcher = host.path().join("inotify-wait");
    build_inotify_wait(&watcher)?;

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("cm"))?;
    // Each `..data` event: the guest's uptime, then what the volume holds.
    let script = "inotify-wait /etc/config ..data | while read ev; do \
                  echo \"$ev $(cut -d' ' -f1 /proc/uptime) $(cat /etc/config/a /etc/config/b) \
                  $(ls /etc/config | tr '\\n' ,)\" >> /tmp/events; done";
    let app = ContainerBuilder::new("app", BUSYBOX)
        .shell(script)
        .mount(s(&cm), "/etc/config", true)
        .mount(s(&watcher), "/bin/inotify-wait", true);
    let app = k.run_container(&pod, &app)?;
    let events = |k: &Kubelet| k.sh(&app, "cat /tmp/events 2>/dev/null || true");
    k.cri()
        .wait_for("the watch in the container", k.timeout(), |_| {
            Ok(events(&k)?.contains("ready").then_some(()))
        })?;
    ensure!(
        k.sh(&app, "cat /etc/config/a /etc/config/b")? == "11",
        "first set"
    );
    let before: f64 = k.sh(&app, "cut -d' ' -f1 /proc/uptime")?.trim().parse()?;
    atomic_write(&cm, 2, &[("a", b"2"), ("b", b"2"), ("new", b"y")])?;
    let line = k
        .cri()
        .wait_for("the update in the container", k.timeout(), |_| {
            Ok(events(&k)?
                .lines()
                .find(|l| l.starts_with("..data"))
                .map(str::to_owned))
        })?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    ensure!(fields.len() == 4, "event line {line:?}");
    let at: f64 = fields[1].parse()?;
    let latency = at - before;
    eprintln!("ConfigMap update seen in the container after at most {latency:.3} s");
    ensure!(fields[2] == "22", "half old, half new: {line:?}");
    ensure!(fields[3] == "a,b,new,", "keys after the update: {line:?}");
    ensure!(
        latency < 1.0,
        "the update took {latency:.3} s to reach the container"
    );
    // The copy is read-only in the container.
    let w = k.sh(
        &app,
        "echo x > /etc/config/a && echo WRITABLE || echo refused",
    )?;
    ensure!(w == "refused\n", "{w:?}");
    k.remove_pod(&pod)?;
    k.finish()
}
