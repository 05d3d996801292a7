//! Scenarios of what a pod spec means that users configure on purpose:
//! pod sysctls, read-only volumes holding submounts, mount propagation.
//! Handler-generic like the rest of `scenarios` (which re-exports them):
//! each asserts what runc does, and returns what a handler may differ in
//! (a documented refusal) for the handler's own test to assert.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::api::MountPropagation;
use super::{ContainerBuilder, ContainerState, CriSetup, Kubelet, BUSYBOX};

/// The pod sysctls of [`pod_sysctls`] and the values containers must read.
const POD_SYSCTLS: [(&str, &str); 3] = [
    ("kernel.shm_rmid_forced", "1"),
    ("kernel.msgmax", "16000"),
    ("net.ipv4.ip_unprivileged_port_start", "2000"),
];

/// A sysctl Linux does not keep per namespace.
pub const HOST_SYSCTL: &str = "vm.swappiness";

/// (j) A pod's sysctls (`securityContext.sysctls`) hold in every one of its
/// containers before the first starts: `kernel.shm_rmid_forced`,
/// `kernel.msgmax` (IPC namespace), `net.ipv4.ip_unprivileged_port_start`
/// (network namespace). A pod asking for a sysctl that is not namespaced
/// (`vm.swappiness`) fails to start with an error naming it; returns that
/// error for the handler's own assertions.
pub fn pod_sysctls(setup: &CriSetup) -> Result<String> {
    let k = Kubelet::start(setup)?;
    let mut pod = k.pod("sysctls");
    for (name, value) in POD_SYSCTLS {
        pod = pod.sysctl(name, value);
    }
    let pod = k.run_pod(&pod)?;
    // The first container reads them at its start: before any exec.
    let script = POD_SYSCTLS
        .iter()
        .map(|(n, _)| format!("cat /proc/sys/{}", n.replace('.', "/")))
        .collect::<Vec<_>>()
        .join("; ");
    let first = ContainerBuilder::new("first", BUSYBOX)
        .shell(&format!("({script}) > /tmp/at-start; exec sleep 100000"));
    let ids = [
        k.run_container(&pod, &first)?,
        k.run_container(&pod, &ContainerBuilder::sleeper("second"))?,
    ];
    let want: Vec<&str> = POD_SYSCTLS.iter().map(|(_, v)| *v).collect();
    for id in &ids {
        k.cri()
            .wait_container_state(id, ContainerState::ContainerRunning, k.timeout())?;
        let seen = k.sh(id, &script)?;
        let seen: Vec<&str> = seen.lines().map(str::trim).collect();
        ensure!(seen == want, "sysctls in {id}: {seen:?}, want {want:?}");
    }
    let at_start = k
        .cri()
        .wait_for("the first container's reading", k.timeout(), |c| {
            let r = c.exec_sync(&ids[0], &["cat", "/tmp/at-start"], k.timeout())?;
            Ok((r.exit_code == 0 && r.stdout.lines().count() == want.len()).then_some(r.stdout))
        })?;
    let at_start: Vec<&str> = at_start.lines().map(str::trim).collect();
    ensure!(at_start == want, "at the first start: {at_start:?}");
    k.remove_pod(&pod)?;

    let refused = k.run_pod(&k.pod("host-sysctl").sysctl(HOST_SYSCTL, "10"));
    let error = match refused {
        Ok(p) => {
            k.remove_pod(&p)?;
            bail!("a pod setting {HOST_SYSCTL} started");
        }
        Err(e) => format!("{e:#}"),
    };
    ensure!(error.contains(HOST_SYSCTL), "the refusal names it: {error}");
    k.finish()?;
    Ok(error)
}

/// Host mounts made by a test, lazily unmounted on drop (last first).
#[derive(Default)]
struct HostMounts(Vec<PathBuf>);

impl HostMounts {
    fn tmpfs(&mut self, at: &Path) -> Result<()> {
        let none = None::<&str>;
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), none)
            .with_context(|| format!("mounting a tmpfs at {}", at.display()))?;
        self.0.push(at.to_path_buf());
        Ok(())
    }

    /// `dir` bound on itself and made shared, as containerd requires of a
    /// HostToContainer or Bidirectional source (a node's / is shared).
    fn shared(&mut self, dir: &Path) -> Result<()> {
        let none = None::<&str>;
        mount(Some(dir), dir, none, MsFlags::MS_BIND, none)
            .with_context(|| format!("binding {}", dir.display()))?;
        self.0.push(dir.to_path_buf());
        mount(none, dir, none, MsFlags::MS_SHARED, none)
            .with_context(|| format!("making {} shared", dir.display()))?;
        Ok(())
    }

    /// Unmounts `at` on drop too (a mount that may arrive there).
    fn expect(&mut self, at: &Path) {
        self.0.push(at.to_path_buf());
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let _ = umount2(at, MntFlags::MNT_DETACH);
        }
    }
}

/// Whether `script` succeeds in container `id`.
fn succeeds(k: &Kubelet, id: &str, script: &str) -> Result<bool> {
    let r = k.cri().exec_sync(id, &["sh", "-c", script], k.timeout())?;
    Ok(r.exit_code == 0)
}

/// (k) A read-only volume whose host directory holds a read-write tmpfs:
/// without `recursiveReadOnly` the volume is read-only and the tmpfs in it
/// writable (what is written there reaches the host); with it (when the
/// handler reports the feature, as a kubelet checks) both are read-only.
/// Returns whether the handler reported `recursiveReadOnly`.
pub fn read_only_submounts(setup: &CriSetup) -> Result<bool> {
    let host = tempfile::tempdir()?;
    let vol = host.path().join("vol");
    let sub = vol.join("sub");
    std::fs::create_dir_all(&sub)?;
    std::fs::write(vol.join("top"), "top\n")?;
    let mut mounts = HostMounts::default();
    mounts.tmpfs(&sub)?;
    std::fs::write(sub.join("in"), "in\n")?;
    let vol_s = vol.to_str().context("volume path")?;

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("rosub"))?;
    let ro = k.run_container(
        &pod,
        &ContainerBuilder::sleeper("ro").mount(vol_s, "/ro", true),
    )?;
    k.cri()
        .wait_container_state(&ro, ContainerState::ContainerRunning, k.timeout())?;
    ensure!(
        k.sh(&ro, "cat /ro/top /ro/sub/in")? == "top\nin\n",
        "contents"
    );
    ensure!(
        !succeeds(&k, &ro, "touch /ro/new")?,
        "the read-only volume was writable"
    );
    ensure!(
        succeeds(&k, &ro, "echo w > /ro/sub/new")?,
        "the read-write tmpfs in a read-only (not recursively) volume was not writable"
    );
    ensure!(
        std::fs::read_to_string(sub.join("new")).ok().as_deref() == Some("w\n"),
        "the write in the submount did not reach the host"
    );

    let rro = k.cri().supports_recursive_read_only(k.handler())?;
    if rro {
        let c = ContainerBuilder::sleeper("rro").mount_with(
            vol_s,
            "/rro",
            true,
            true,
            MountPropagation::PropagationPrivate,
        );
        let id = k.run_container(&pod, &c)?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        ensure!(k.sh(&id, "cat /rro/sub/in")? == "in\n", "rro contents");
        for path in ["/rro/new", "/rro/sub/new2"] {
            ensure!(
                !succeeds(&k, &id, &format!("touch {path}"))?,
                "{path} was writable in a recursively read-only volume"
            );
        }
    }
    k.remove_pod(&pod)?;
    k.finish()?;
    drop(mounts);
    Ok(rro)
}

/// What became of a Bidirectional volume in [`mount_propagation`].
#[derive(Debug)]
pub enum Bidirectional {
    /// The container's mount appeared on the host (runc).
    Propagated,
    /// StartContainer failed with this error.
    Refused(String),
}

/// (l) Mount propagation. HostToContainer (`rslave`): a tmpfs the host
/// mounts below the volume after the container started appears in the
/// container. Bidirectional (`rshared`, privileged): a tmpfs the container
/// mounts below the volume appears on the host, or the container is
/// refused (returned for the handler's test to judge).
pub fn mount_propagation(setup: &CriSetup) -> Result<Bidirectional> {
    let host = tempfile::tempdir()?;
    let prop = host.path().join("prop");
    let (late, from_ctr) = (prop.join("late"), prop.join("fromctr"));
    std::fs::create_dir_all(&prop)?;
    let mut mounts = HostMounts::default();
    mounts.shared(&prop)?;
    std::fs::create_dir(&late)?;
    std::fs::create_dir(&from_ctr)?;
    mounts.expect(&from_ctr);
    let prop_s = prop.to_str().context("volume path")?;

    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("propagation").privileged())?;
    let h2c = ContainerBuilder::sleeper("h2c").mount_with(
        prop_s,
        "/prop",
        false,
        false,
        MountPropagation::PropagationHostToContainer,
    );
    let h2c = k.run_container(&pod, &h2c)?;
    k.cri()
        .wait_container_state(&h2c, ContainerState::ContainerRunning, k.timeout())?;
    ensure!(succeeds(&k, &h2c, "test -d /prop/late")?, "the volume");
    mounts.tmpfs(&late)?;
    std::fs::write(late.join("hello"), "from the host\n")?;
    k.cri().wait_for(
        "the host's later mount in the container",
        k.timeout(),
        |c| {
            let r = c.exec_sync(&h2c, &["cat", "/prop/late/hello"], k.timeout())?;
            Ok((r.stdout == "from the host\n").then_some(()))
        },
    )?;

    let bidi = ContainerBuilder::new("bidi", BUSYBOX)
        .privileged()
        .shell("mount -t tmpfs bidi /bidi/fromctr && echo up > /bidi/fromctr/x; exec sleep 100000")
        .mount_with(
            prop_s,
            "/bidi",
            false,
            false,
            MountPropagation::PropagationBidirectional,
        );
    let id = k.create_container(&pod, &bidi)?;
    let outcome = match k.cri().start_container(&id) {
        Ok(()) => {
            k.cri().wait_for(
                "the container's mount on the host",
                Duration::from_secs(30).max(k.timeout()),
                |_| Ok(from_ctr.join("x").exists().then_some(())),
            )?;
            Bidirectional::Propagated
        }
        Err(e) => Bidirectional::Refused(format!("{e:#}")),
    };
    k.remove_pod(&pod)?;
    k.finish()?;
    drop(mounts);
    Ok(outcome)
}
