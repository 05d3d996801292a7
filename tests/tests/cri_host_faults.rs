//! Host-side faults of `clh` pods, through CRI on real VMs (issue 13;
//! catalogue REL-SHIM-01, REL-DISK-01).
//!
//! - `rel_shim_01_delete_cleans_up_after_a_sigkilled_shim`: a pod of two
//!   containers with volumes (a read-write hostPath and an emptyDir-like
//!   directory, bind mounts on the host) runs; containerd is killed, then
//!   the pod's shim is SIGKILLed, and `<shim> delete` is run for each task
//!   exactly as containerd runs it (argv, environment, bundle as cwd):
//!   each finishes within containerd's 5 s cleanup deadline and prints
//!   only a DeleteResponse (protobuf, exit status 137). The sandbox's,
//!   run first, alone leaves no VM process, mount (the containers' rootfs
//!   and binds included), VM directory or pod cgroup. containerd then
//!   comes back, runs its own `delete` again (idempotent), and the pod's
//!   removal through CRI leaves nothing.
//! - `rel_shim_01_containerd_reaps_a_sigkilled_shim`: the same pod, the
//!   shim SIGKILLed under a running containerd: containerd's own `delete`
//!   removes every trace within 5 s, and CRI reports both containers
//!   EXITED.
//! - `rel_disk_01_state_fs_full_or_read_only`: the shim's state root is a
//!   small tmpfs. With it full (blocks and inodes), a new pod and a new
//!   container in a running pod both fail with an error that names the
//!   path; with it read-only, a new pod does. Nothing of them is left; the
//!   running pod keeps working (exec); once space is freed both succeed.
//!
//! Every test ends with the harness's leak checks. Run one at a time
//! (`-- --test-threads=1`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::containerd::{check, CRI_NAMESPACE};
use clh_tests::cri::{ContainerBuilder, ContainerState, CriSetup, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr::{self, state_dir_leaks, vm_processes};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const AGENT_TIMEOUT_MS: u64 = 120_000;
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// containerd's deadline for `<shim> delete` (`cleanupAfterDeadShim`).
const DELETE_DEADLINE: Duration = Duration::from_secs(5);
const VM_PROGRAMS: [&str; 3] = ["qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"];

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let shim_dir = ctr::shim_dir().expect("building the shim");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cri = ctr::cri_setup(&s, shim_dir, images, AGENT_TIMEOUT_MS).expect("CRI setup");
    (s, cri)
}

/// A container writing through both of its volumes, then idling.
fn writer(name: &str, host: &Path, empty_dir: &Path) -> ContainerBuilder {
    let script =
        format!("echo {name} > /data/{name}; echo {name} > /scratch/{name}; exec sleep 100000");
    ContainerBuilder::new(name, BUSYBOX)
        .shell(&script)
        .mount(&host.display().to_string(), "/data", false)
        .mount(&empty_dir.display().to_string(), "/scratch", false)
}

/// A pod of two [`writer`]s with their volumes under `volumes`; returns
/// the pod and the container ids once both wrote their files.
fn pod_with_volumes(k: &Kubelet, name: &str, volumes: &Path) -> Result<(Pod, Vec<String>)> {
    let host = volumes.join("host");
    let empty_dir = volumes.join("empty-dir");
    for d in [&host, &empty_dir] {
        std::fs::create_dir_all(d)?;
    }
    let pod = k.run_pod(&k.pod(name))?;
    let mut ids = Vec::new();
    for c in ["one", "two"] {
        let id = k.run_container(&pod, &writer(c, &host, &empty_dir))?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        ids.push(id);
    }
    k.cri().wait_for("both writers' files", k.timeout(), |_| {
        let all = ["one", "two"]
            .iter()
            .all(|c| host.join(c).exists() && empty_dir.join(c).exists());
        Ok(all.then_some(()))
    })?;
    Ok((pod, ids))
}

/// What the pod's VM holds on the host now: its processes, the mounts
/// under its directory, the directory itself, its cgroup.
fn vm_traces(vm_dir: &Path, cgroup: Option<&str>) -> Vec<String> {
    let mut left = Vec::new();
    for p in VM_PROGRAMS {
        left.extend(
            vm_processes(p, vm_dir)
                .iter()
                .map(|pid| format!("{p} {pid}")),
        );
    }
    let needle = format!(" {}", vm_dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mountinfo
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| format!("mount {l}")),
    );
    if vm_dir.exists() {
        left.push(format!("dir {}", vm_dir.display()));
    }
    if let Some(cg) = cgroup {
        let rel = cg.trim_start_matches('/');
        for e in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = e.path().join(rel);
            if dir.is_dir() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        let unified = Path::new("/sys/fs/cgroup").join(rel);
        if unified.is_dir()
            && !left
                .iter()
                .any(|l| l.ends_with(&*unified.to_string_lossy()))
        {
            left.push(format!("cgroup {}", unified.display()));
        }
    }
    left
}

/// containerd's bundle of task `id` (containerd 2.x layout).
fn bundle(k: &Kubelet, id: &str) -> PathBuf {
    k.containerd()
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(CRI_NAMESPACE)
        .join(id)
}

/// The sandbox's host cgroup (its spec's `linux.cgroupsPath`).
fn sandbox_cgroup(k: &Kubelet, pod: &Pod) -> Result<String> {
    let path = bundle(k, &pod.id).join("config.json");
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    spec.pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .map(str::to_owned)
        .with_context(|| format!("no cgroupsPath in {}", path.display()))
}

/// Runs `<shim> delete` for task `id` as containerd 2.x's
/// `cleanupAfterDeadShim` does (core/runtime/v2/binary.go, shim/util
/// `Command`): same argv, its environment plus the addresses, the bundle
/// as cwd. Returns the DeleteResponse and how long it took, failing on
/// anything but a lone valid DeleteResponse on stdout within 5 s.
fn shim_delete(k: &Kubelet, cri: &CriSetup, id: &str) -> Result<(DeleteResponse, Duration)> {
    let ctd = k.containerd();
    let shim = cri
        .shim_dir
        .as_ref()
        .context("no shim dir")?
        .join("containerd-shim-clh-v2");
    let address = ctd.address().display().to_string();
    let bundle = bundle(k, id);
    let mut cmd = Command::new(&shim);
    cmd.args(["-namespace", CRI_NAMESPACE, "-address", &address])
        .arg("-publish-binary")
        .arg(ctd.version().bin_dir().join("containerd"))
        .args(["-id", id, "-bundle"])
        .arg(&bundle)
        .args(["-debug", "delete"])
        .current_dir(&bundle)
        .envs(cri.env.iter().map(|(k, v)| (k, v)))
        .env("GOMAXPROCS", "2")
        .env("TTRPC_ADDRESS", format!("{address}.ttrpc"))
        .env("GRPC_ADDRESS", &address)
        .env("NAMESPACE", CRI_NAMESPACE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let t = Instant::now();
    let out = clh_tests::containerd::run_with_timeout(cmd, DELETE_DEADLINE * 4)?;
    let took = t.elapsed();
    check(&out, &format!("{} delete {id}", shim.display()))?;
    ensure!(
        took < DELETE_DEADLINE,
        "delete of {id} took {took:?}, past containerd's {DELETE_DEADLINE:?}"
    );
    // An empty stdout would parse as a default response: require one.
    ensure!(!out.stdout.is_empty(), "delete of {id} printed nothing");
    let resp = DeleteResponse::parse_from_bytes(&out.stdout).with_context(|| {
        format!(
            "delete of {id}: stdout is not a DeleteResponse: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    ensure!(
        resp.exit_status == 128 + 9 && resp.exited_at.is_some(),
        "delete of {id}: {resp:?}"
    );
    // Re-encoding gives the same bytes: nothing else was printed.
    ensure!(
        resp.write_to_bytes()? == out.stdout,
        "delete of {id} printed more than its DeleteResponse: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok((resp, took))
}

fn sigkill(pids: &[i32]) -> Result<()> {
    for &pid in pids {
        kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("SIGKILL {pid}"))?;
    }
    Ok(())
}

#[test]
fn rel_shim_01_delete_cleans_up_after_a_sigkilled_shim() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        let volumes = tempfile::tempdir()?;
        let mut k = Kubelet::start(&cri)?;
        let (pod, ids) = pod_with_volumes(&k, "crash", volumes.path())?;
        let vm_dir = s.state_dir.join(&pod.id);
        let cgroup = sandbox_cgroup(&k, &pod)?;
        let before = vm_traces(&vm_dir, Some(&cgroup));
        for what in ["qemu", "virtiofsd", "mount ", "dir ", "cgroup "] {
            ensure!(
                before.iter().any(|l| l.contains(what)),
                "no {what} seen while the pod runs: {before:#?}"
            );
        }
        // containerd first, so that its own cleanup does not race ours.
        k.containerd_mut().kill_daemon()?;
        let shims = k.containerd().shims();
        ensure!(shims.len() == 1, "one shim per pod, found {shims:?}");
        sigkill(&shims)?;
        k.cri().wait_for("the shim to die", DELETE_DEADLINE, |_| {
            Ok(k.containerd().shims().is_empty().then_some(()))
        })?;

        // The sandbox first: the order containerd uses is the directory's,
        // and the sandbox's delete must not need its containers' first.
        // The sandbox's delete alone takes the whole VM down, the
        // containers' binds and rootfs mounts included (kata#1896).
        let t = Instant::now();
        let (_, took) = shim_delete(&k, &cri, &pod.id)?;
        eprintln!("REL-SHIM-01: delete of the sandbox took {took:?}");
        let left = vm_traces(&vm_dir, Some(&cgroup));
        ensure!(
            left.is_empty(),
            "left after the sandbox's delete: {left:#?}"
        );
        for id in &ids {
            let (_, took) = shim_delete(&k, &cri, id)?;
            eprintln!("REL-SHIM-01: delete of container {id} took {took:?}");
        }
        eprintln!("REL-SHIM-01: three deletes took {:?}", t.elapsed());
        // Twice is harmless (containerd may run it again).
        shim_delete(&k, &cri, &pod.id)?;
        // The volumes' files are the user's: still there.
        for c in ["one", "two"] {
            ensure!(
                volumes.path().join("host").join(c).exists(),
                "host/{c} gone"
            );
        }

        k.restart_containerd()?;
        exited_then_removed(k, &pod, &ids)
    };
    run().unwrap();
}

#[test]
fn rel_shim_01_containerd_reaps_a_sigkilled_shim() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        let volumes = tempfile::tempdir()?;
        let k = Kubelet::start(&cri)?;
        let (pod, ids) = pod_with_volumes(&k, "reaped", volumes.path())?;
        let vm_dir = s.state_dir.join(&pod.id);
        let cgroup = sandbox_cgroup(&k, &pod)?;
        let shims = k.containerd().shims();
        ensure!(shims.len() == 1, "one shim per pod, found {shims:?}");
        let t = Instant::now();
        sigkill(&shims)?;
        let mut left = Vec::new();
        let cleaned = k.cri().wait_for("containerd's cleanup", k.timeout(), |_| {
            left = vm_traces(&vm_dir, Some(&cgroup));
            Ok(left.is_empty().then_some(()))
        });
        cleaned.with_context(|| format!("left: {left:#?}"))?;
        let took = t.elapsed();
        eprintln!("REL-SHIM-01: containerd cleaned up the SIGKILLed shim's pod in {took:?}");
        ensure!(took < DELETE_DEADLINE, "cleanup took {took:?}");
        exited_then_removed(k, &pod, &ids)
    };
    run().unwrap();
}

/// CRI reports every container of `pod` EXITED; then the pod's removal
/// leaves nothing.
fn exited_then_removed(k: Kubelet, pod: &Pod, ids: &[String]) -> Result<()> {
    for id in ids {
        k.cri()
            .wait_container_state(id, ContainerState::ContainerExited, k.timeout())?;
    }
    k.remove_pod(pod)?;
    k.finish()
}

/// A small tmpfs over the shim's state root, unmounted on drop.
struct StateFs {
    root: PathBuf,
}

impl StateFs {
    /// 32 MiB and 4096 inodes: room for a pod or two, quick to fill.
    fn mount(root: &Path) -> Result<Self> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(root)?;
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=32m,nr_inodes=4096,mode=0700"),
        )
        .with_context(|| format!("mounting a tmpfs on {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn filler(&self) -> PathBuf {
        self.root.join("filler")
    }

    /// Fills every block, then every inode.
    fn fill(&self) -> Result<()> {
        use std::io::Write;
        let dir = self.filler();
        std::fs::create_dir(&dir)?;
        let mut blob = std::fs::File::create(dir.join("blob"))?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match blob.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e).context("filling the state fs"),
            }
        }
        // The last partial chunk may have left a few bytes: fill them.
        while blob.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        for i in 0.. {
            match std::fs::File::create(dir.join(format!("i{i}"))) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e).context("using up the state fs's inodes"),
            }
            ensure!(i < 100_000, "the state fs never ran out of inodes");
        }
        Ok(())
    }

    fn free(&self) -> Result<()> {
        std::fs::remove_dir_all(self.filler()).context("freeing the state fs")
    }

    /// Makes the state root read-only for new paths: a read-only recursive
    /// bind of it over itself (the tmpfs cannot be remounted read-only
    /// while the running pod's logs are open on it; those stay writable).
    fn read_only(&self) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        let none = None::<&str>;
        let root = &self.root;
        mount(
            Some(root),
            root,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .and_then(|()| {
            mount(
                none,
                root,
                none,
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                none,
            )
        })
        .and_then(|()| {
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
            mount(none, root, none, ro, none)
        })
        .with_context(|| format!("making {} read-only", root.display()))
    }

    /// Undoes [`read_only`](Self::read_only).
    fn writable(&self) -> Result<()> {
        use nix::mount::{umount2, MntFlags};
        umount2(&self.root, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting the read-only bind of {}", self.root.display()))
    }
}

impl Drop for StateFs {
    /// Every mount on the root: the read-only bind, if left, then the tmpfs.
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        while umount2(&self.root, MntFlags::MNT_DETACH).is_ok() {}
    }
}

/// A new pod must fail with an error naming the state root, and leave
/// nothing.
fn pod_refused(k: &Kubelet, s: &ctr::Setup, what: &str) -> Result<()> {
    let root = s.state_dir.display().to_string();
    let before: Vec<_> = k
        .cri()
        .list_pod_sandbox()?
        .into_iter()
        .map(|p| p.id)
        .collect();
    let err = match k.run_pod(&k.pod(&format!("refused-{what}"))) {
        Ok(p) => bail!("a pod started on a {what} state fs: {}", p.id),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("REL-DISK-01 ({what}): RunPodSandbox: {err}");
    ensure!(err.contains(&root), "the error does not name {root}: {err}");
    ensure!(
        says_what_to_do(&err),
        "the error does not say what to do: {err}"
    );
    // containerd removes a sandbox that failed to start; a kubelet would
    // remove one it still listed.
    for p in k.cri().list_pod_sandbox()? {
        if !before.contains(&p.id) {
            k.cri().stop_pod_sandbox(&p.id)?;
            k.cri().remove_pod_sandbox(&p.id)?;
        }
    }
    Ok(())
}

/// The shim's hint for a full or read-only file system (service/error.rs).
fn says_what_to_do(err: &str) -> bool {
    err.contains("free space on it") || err.contains("remount it read-write")
}

/// A new container in `running` must fail with an error naming the state
/// root, and leave nothing.
fn container_refused(k: &Kubelet, s: &ctr::Setup, running: &Pod, what: &str) -> Result<()> {
    let root = s.state_dir.display().to_string();
    let c = ContainerBuilder::new(&format!("refused-{what}"), BUSYBOX).command(&["true"]);
    let id = k.create_container(running, &c)?;
    let err = match k.cri().start_container(&id) {
        Ok(()) => bail!("a container started on a {what} state fs"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("REL-DISK-01 ({what}): StartContainer: {err}");
    ensure!(err.contains(&root), "the error does not name {root}: {err}");
    ensure!(
        says_what_to_do(&err),
        "the error does not say what to do: {err}"
    );
    k.cri().remove_container(&id)?;
    let private = s.state_dir.join(&running.id).join("private").join(&id);
    ensure!(!private.exists(), "{} was left", private.display());
    Ok(())
}

/// Only the running pod is under the state root, and it still works.
fn only_the_survivor(k: &Kubelet, s: &ctr::Setup, running: &Pod, alive: &str) -> Result<()> {
    let mut entries: Vec<String> = std::fs::read_dir(&s.state_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "filler")
        .collect();
    entries.sort();
    ensure!(
        entries == vec![running.id.clone()],
        "state root holds {entries:?}"
    );
    let r = k.cri().exec_sync(alive, &["echo", "alive"], EXEC_TIMEOUT)?;
    ensure!(r.stdout == "alive\n" && r.exit_code == 0, "{r:?}");
    Ok(())
}

#[test]
fn rel_disk_01_state_fs_full_or_read_only() {
    let (s, cri) = setup();
    let run = || -> Result<()> {
        let fs = StateFs::mount(&s.state_dir)?;
        let k = Kubelet::start(&cri)?;
        let pod = k.run_pod(&k.pod("survivor"))?;
        let alive = k.run_container(
            &pod,
            &ContainerBuilder::new("alive", BUSYBOX).shell("while :; do echo tick; sleep 1; done"),
        )?;
        k.cri()
            .wait_container_state(&alive, ContainerState::ContainerRunning, k.timeout())?;

        fs.fill()?;
        pod_refused(&k, &s, "full")?;
        container_refused(&k, &s, &pod, "full")?;
        only_the_survivor(&k, &s, &pod, &alive)?;
        fs.free()?;
        // Read-only for new pods only: the running pod's directory holds
        // mounts of its own, which a bind over the root does not make
        // read-only (and the tmpfs cannot be remounted read-only while
        // its logs are open).
        fs.read_only()?;
        let refused = pod_refused(&k, &s, "read-only");
        fs.writable()?;
        refused?;
        only_the_survivor(&k, &s, &pod, &alive)?;

        // Recovery: space is back, both work again.
        let c = k.run_container(&pod, &ContainerBuilder::sleeper("later"))?;
        k.cri()
            .wait_container_state(&c, ContainerState::ContainerRunning, k.timeout())?;
        let other = k.run_pod(&k.pod("after"))?;
        k.remove_pod(&other)?;
        k.remove_pod(&pod)?;
        ensure!(
            state_dir_leaks(&s.state_dir)
                .iter()
                .all(|l| l.starts_with("mount ")),
            "{:#?}",
            state_dir_leaks(&s.state_dir)
        );
        drop(fs);
        k.finish()
    };
    run().unwrap();
}
