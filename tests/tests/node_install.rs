//! The node installer (`clh-install`, installer/) against a scratch host
//! root holding a real containerd's config, as a node has it: containerd
//! 2.1 (config version 3: a drop-in, deep-merged) and 1.7 (version 2: the
//! handler in place, since 1.x lets an imported CRI table replace the
//! node's), each with and without an existing `imports` glob and a site
//! drop-in of the admin's own. Each test:
//!
//! 1. installs payload A, then starts a real containerd from the node's
//!    resulting config (no shim on its PATH, no CLH_SHIM_CONFIG: the CRI
//!    handler's runtime_path and the version's own config are all it has)
//!    and runs a `clh` pod in a VM through CRI;
//! 2. installs A again: nothing changes, containerd is not restarted;
//! 3. upgrades to payload B while the pod runs: containerd's config does not
//!    change, so containerd is not restarted; the old pod keeps answering;
//!    a new pod runs B's shim; A stays on disk while its shim runs;
//! 4. removes the pods and uninstalls: the node's config is back byte for
//!    byte, and nothing install made is left.
//!
//! Run one at a time (`-- --test-threads=1`): each boots VMs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::ContainerdVersion;
use clh_tests::cri::{scenarios, ContainerBuilder, Kubelet};
use clh_tests::ctr;
use clh_tests::node::{self, payload, SHIM};

const AGENT_TIMEOUT_MS: u64 = 120_000;
#[test]
fn containerd_2_1_without_imports() {
    install_upgrade_uninstall(ContainerdVersion::V2, false).unwrap();
}

#[test]
fn containerd_2_1_with_an_imports_glob() {
    install_upgrade_uninstall(ContainerdVersion::V2, true).unwrap();
}

#[test]
fn containerd_1_7_without_imports() {
    install_upgrade_uninstall(ContainerdVersion::V1_7, false).unwrap();
}

#[test]
fn containerd_1_7_with_an_imports_glob() {
    install_upgrade_uninstall(ContainerdVersion::V1_7, true).unwrap();
}
/// The scratch host root and what it held before install.
struct Node {
    root: tempfile::TempDir,
    installer: PathBuf,
    containerd: PathBuf,
}

impl Node {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn main_config(&self) -> PathBuf {
        self.path("etc/containerd/config.toml")
    }

    fn restarts(&self) -> usize {
        fs::read_to_string(self.path("restarts"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// `clh-install <command> --payload <payload>` on this node; its output.
    fn run(&self, command: &str, payload: &Path) -> Result<String> {
        let restart = format!("echo restarted >> {}", self.path("restarts").display());
        let out = Command::new(&self.installer)
            .arg(command)
            .arg("--payload")
            .arg(payload)
            .arg("--prefix")
            .arg(self.path("opt/clh-shim"))
            .arg("--containerd-config")
            .arg(self.main_config())
            .arg("--drop-in-dir")
            .arg(self.path("etc/containerd/conf.d"))
            .arg("--link-dir")
            .arg(self.path("usr/local/bin"))
            .arg("--containerd")
            .arg(&self.containerd)
            .arg("--restart-command")
            .arg(restart)
            .output()
            .context("running clh-install")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "clh-install {command} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("clh-install {command}:\n{text}");
        Ok(text)
    }

    /// The version `current` points at.
    fn current(&self) -> Result<String> {
        let target = fs::read_link(self.path("opt/clh-shim/current"))?;
        Ok(target
            .file_name()
            .context("current names no version")?
            .to_string_lossy()
            .into_owned())
    }

    /// Every file and directory under the root, for "nothing left".
    fn listing(&self) -> Vec<String> {
        node::listing(self.root.path())
    }
}

/// A pod with one sleeping busybox container: (pod, container id).
fn sleeper_pod(k: &Kubelet, name: &str) -> Result<(clh_tests::cri::Pod, String)> {
    let pod = k.run_pod(&k.pod(name))?;
    let id = k.run_container(&pod, &ContainerBuilder::sleeper(name))?;
    Ok((pod, id))
}

/// The pid's executable, resolved.
fn exe(pid: i32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}
fn install_upgrade_uninstall(version: ContainerdVersion, with_imports: bool) -> Result<()> {
    let s = ctr::setup()?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shim = ctr::shim_dir()?.join(SHIM);
    let mut cri = ctr::cri_setup(&s, ctr::shim_dir()?, images, AGENT_TIMEOUT_MS)?;
    let template = fs::read_to_string(&s.config)?;
    let node = Arc::new(Node {
        root: tempfile::Builder::new()
            .prefix("node-")
            .tempdir_in("/tmp")?,
        installer: ctr::built_binary("clh-install", "clh-install", false)?,
        containerd: version.bin_dir().join("containerd"),
    });
    let work = tempfile::Builder::new()
        .prefix("payload-")
        .tempdir_in("/tmp")?;
    let payload_a = payload(
        &work.path().join("a"),
        &shim,
        &s.image,
        &format!("# payload A\n{template}"),
    )?;
    let payload_b = payload(
        &work.path().join("b"),
        &shim,
        &s.image,
        &format!("# payload B\n{template}"),
    )?;

    // The node before install: the harness's config without the clh
    // handler, and for `with_imports` a glob import with a site drop-in.
    let original = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (n, a, orig) = (node.clone(), payload_a.clone(), original.clone());
    cri.version = version;
    cri.shim_dir = None;
    cri.env.clear();
    cri.node_config = Some(Arc::new(move |_dir, base| {
        let conf_d = n.path("etc/containerd/conf.d");
        fs::create_dir_all(&conf_d)?;
        let mut text = String::from("# the node's own config\n");
        for line in base.lines() {
            text.push_str(line);
            text.push('\n');
            if with_imports && line.starts_with("version") {
                text.push_str(&format!("imports = [\"{}/*.toml\"]\n", conf_d.display()));
            }
        }
        if with_imports {
            let site = if version == ContainerdVersion::V2 {
                3
            } else {
                2
            };
            fs::write(
                conf_d.join("00-site.toml"),
                format!("version = {site}\n[debug]\n  level = \"info\"\n"),
            )?;
        }
        fs::write(n.main_config(), &text)?;
        *orig.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = text.into_bytes();
        n.run("install", &a)?;
        Ok(n.main_config())
    }));
    let k = Kubelet::start(&cri)?;
    let after_install = node.listing();
    ensure!(
        node.restarts() == 1,
        "install changed containerd's config: one restart, not {}",
        node.restarts()
    );
    let version_a = node.current()?;
    // The node's own CRI settings are all still in force (1.x would have
    // dropped them for an imported CRI table).
    let dump = k.containerd().config_dump()?;
    let cni_dir = format!("{}/cni/net.d", k.containerd().dir().display());
    ensure!(
        dump.contains(&cni_dir) && dump.contains("restrict_oom_score_adj = true"),
        "the node's CRI settings are gone from containerd's merged config:\n{dump}"
    );
    ensure!(
        fs::read_link(node.path("usr/local/bin").join(SHIM))?
            == node.path("opt/clh-shim/current/bin").join(SHIM),
        "the ctr symlink points through current"
    );

    // 1. A pod from the installed handler, in a VM.
    let (pod_a, c_a) = sleeper_pod(&k, "installed")?;
    let host_boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    ensure!(
        scenarios::boot_id(k.cri(), &c_a)? != host_boot.trim(),
        "the pod runs in a VM"
    );
    let shims = k.containerd().shims();
    ensure!(
        shims
            .iter()
            .all(|p| exe(*p).starts_with(node.path("opt/clh-shim/versions").join(&version_a))),
        "the pod's shim runs from version {version_a}: {:?}",
        shims.iter().map(|p| exe(*p)).collect::<Vec<_>>()
    );

    // 2. Again: a no-op.
    let main_installed = fs::read(node.main_config())?;
    let out = node.run("install", &payload_a)?;
    ensure!(
        out.contains("already installed") && out.contains("containerd not restarted"),
        "{out}"
    );
    ensure!(node.restarts() == 1, "a reinstall restarted containerd");
    ensure!(
        fs::read(node.main_config())? == main_installed,
        "a reinstall changed the config"
    );
    ensure!(
        node.listing() == after_install,
        "a reinstall changed files:\n{:?}\n{:?}",
        after_install,
        node.listing()
    );

    // 3. Upgrade under a running pod.
    let out = node.run("install", &payload_b)?;
    let version_b = node.current()?;
    ensure!(version_b != version_a, "payload B is a new version");
    ensure!(
        node.restarts() == 1,
        "an upgrade restarted containerd:\n{out}"
    );
    ensure!(
        out.contains(&format!("kept version {version_a}")),
        "version A stays while its shim runs:\n{out}"
    );
    ensure!(
        fs::read(node.main_config())? == main_installed,
        "an upgrade changed the config"
    );
    ensure!(
        scenarios::boot_id(k.cri(), &c_a)? != host_boot.trim(),
        "the old pod still answers"
    );
    let (pod_b, c_b) = sleeper_pod(&k, "upgraded")?;
    scenarios::boot_id(k.cri(), &c_b)?;
    let new_shims: Vec<PathBuf> = k.containerd().shims().iter().map(|p| exe(*p)).collect();
    ensure!(
        new_shims
            .iter()
            .any(|e| e.starts_with(node.path("opt/clh-shim/versions").join(&version_b))),
        "the new pod's shim runs from version {version_b}: {new_shims:?}"
    );

    // 4. Uninstall refuses while pods run, then restores the node.
    let refused = Command::new(&node.installer)
        .args(["uninstall", "--prefix"])
        .arg(node.path("opt/clh-shim"))
        .output()?;
    ensure!(
        !refused.status.success(),
        "uninstall went ahead under running pods"
    );
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("drain"),
        "{refused:?}"
    );
    k.remove_pod(&pod_a)?;
    k.remove_pod(&pod_b)?;
    let out = node.run("uninstall", &payload_b)?;
    ensure!(
        node.restarts() == 2,
        "uninstall changed containerd's config: a restart\n{out}"
    );
    let original = original
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        fs::read(node.main_config())? == original,
        "the config is not back byte for byte:\n{out}"
    );
    let mut expected = vec![
        "etc".to_owned(),
        "etc/containerd".into(),
        "etc/containerd/conf.d".into(),
        "etc/containerd/config.toml".into(),
        "restarts".into(),
    ];
    if with_imports {
        expected.push("etc/containerd/conf.d/00-site.toml".into());
    }
    expected.sort();
    ensure!(
        node.listing() == expected,
        "left on the node: {:?}",
        node.listing()
    );
    k.finish()?;
    drop(s);
    Ok(())
}
