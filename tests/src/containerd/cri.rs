//! What a private containerd needs to serve the CRI like a node's: the
//! pause image as sandbox image, a loopback-only CNI network, network
//! namespaces and runc state inside its dir, a kubelet-like cgroup root,
//! and a restart that keeps the shims running.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::procs::{listening_sockets, wait_deadline};
use super::{ContainerdVersion, PrivateContainerd, STOP_TIMEOUT};

/// Where Debian's `containernetworking-plugins` puts the CNI plugins
/// (packaging/install-deps.sh installs it); we use `static` and `loopback`.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The sandbox (pause) image the CRI plugin is pinned to; tests import it
/// from tests/images/build-pause-image.sh (no registry is reachable).
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The loopback-only network: nothing outside the pod's netns changes (no
/// bridge, veth, route, IPAM state or sysctl on the host). containerd takes
/// the pod IP from the result's `eth0` and fails RunPodSandbox without
/// one, and the loopback plugin alone reports only `lo`. So the chain
/// starts with the `static` IPAM plugin run as a plugin of its own: its
/// result holds 127.0.0.1 bound to no interface, which go-cni gives to
/// `eth0`; `loopback` then brings `lo` up and passes that result on.
const CNI_CONFIG: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "clh-test-lo",
  "plugins": [
    { "type": "static", "ipam": { "addresses": [ { "address": "127.0.0.1/8" } ] } },
    { "type": "loopback" }
  ]
}
"#;

impl ContainerdVersion {
    /// The CRI part of the config: the shipped clh snippet plus our keys.
    /// The snippet already opens the CRI runtime table (TOML allows a table
    /// once), so keys of that table are inserted below its header.
    pub(super) fn cri_config(self, dir: &Path, snippet: &str) -> String {
        let d = dir.display();
        // This host has no CAP_SYS_RESOURCE, so the CRI cannot lower a
        // container's oom_score_adj below its own: clamp it instead of
        // failing every create. A test-host setting only: the shipped
        // snippets leave it to the node.
        let runtime_keys = "  netns_mounts_under_state_dir = true\n  restrict_oom_score_adj = true";
        match self {
            ContainerdVersion::V2 => {
                let runtime = "[plugins.'io.containerd.cri.v1.runtime']";
                format!(
                    "{snippet}\n\n\
                     [plugins.'io.containerd.cri.v1.runtime'.cni]\n  \
                     conf_dir = \"{d}/cni/net.d\"\n  bin_dirs = [\"{CNI_BIN_DIR}\"]\n  \
                     max_conf_num = {MAX_NETWORKS}\n\n\
                     [plugins.'io.containerd.cri.v1.images'.pinned_images]\n  \
                     sandbox = \"{SANDBOX_IMAGE}\"\n\n\
                     [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  \
                     runtime_type = \"io.containerd.runc.v2\"\n\n\
                     [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  \
                     Root = \"{d}/runc\"\n",
                    snippet = insert_keys(snippet, runtime, runtime_keys),
                )
            }
            ContainerdVersion::V1_6 | ContainerdVersion::V1_7 => {
                let cri = "[plugins.\"io.containerd.grpc.v1.cri\"]";
                let keys = format!("{runtime_keys}\n  sandbox_image = \"{SANDBOX_IMAGE}\"");
                format!(
                    "{snippet}\n\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  \
                     conf_dir = \"{d}/cni/net.d\"\n  bin_dir = \"{CNI_BIN_DIR}\"\n  \
                     max_conf_num = {MAX_NETWORKS}\n\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  \
                     Root = \"{d}/runc\"\n",
                    snippet = insert_keys(snippet, cri, &keys),
                )
            }
        }
    }
}

/// `text` with `keys` inserted below the line `header`, or with both
/// appended when it has no such line.
fn insert_keys(text: &str, header: &str, keys: &str) -> String {
    let mut out = Vec::new();
    let mut found = false;
    for line in text.lines() {
        out.push(line.to_owned());
        if !found && line.trim() == header {
            out.push(keys.to_owned());
            found = true;
        }
    }
    if !found {
        out.push(format!("\n{header}\n{keys}"));
    }
    out.join("\n")
}

/// The first bridge network's subnets; its gateway (on the host's bridge)
/// is the first address of each. Network `n` has 10.123.`n`.0/24 and
/// fd12:3456:`n`::/64.
pub const BRIDGE_SUBNET_V4: &str = "10.123.0.0/24";
pub const BRIDGE_SUBNET_V6: &str = "fd12:3456::/64";
pub const BRIDGE_GATEWAY_V4: &str = "10.123.0.1";
pub const BRIDGE_GATEWAY_V6: &str = "fd12:3456::1";

/// How many CNI networks a pod may get (eth0, eth1): containerd attaches
/// a pod to each config file in the conf dir, up to this many.
const MAX_NETWORKS: usize = 2;

/// Dual-stack bridge network `n` as a node's: Debian's `bridge` and
/// `host-local` plugins, the host the gateway, the IPAM state inside the
/// containerd's dir, no masquerade (nothing leaves the host); `portmap`
/// for hostPorts (iptables DNAT on the host, removed with the pod).
fn bridge_config(n: usize, bridge: &str, ipam_dir: &Path) -> String {
    let v4 = format!("10.123.{n}.0/24");
    let v6 = format!("fd12:3456:{n}::/64");
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "clh-test-bridge{n}",
  "plugins": [
    {{
      "type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local", "dataDir": "{ipam}",
        "ranges": [[{{ "subnet": "{v4}" }}], [{{ "subnet": "{v6}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}, {{ "dst": "::/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
        ipam = ipam_dir.display()
    )
}

impl PrivateContainerd {
    /// Writes our CNI networks into our CNI conf dir: the loopback-only
    /// one, or the bridges of [`PrivateContainerd::use_bridge_networks`].
    pub(super) fn write_cni_config(&self) -> Result<()> {
        let conf_dir = self.dir.join("cni/net.d");
        fs::create_dir_all(&conf_dir)?;
        let ipam = self.dir.join("cni/ipam");
        let configs: Vec<String> = match self.cni_bridges.as_slice() {
            [] => vec![CNI_CONFIG.to_owned()],
            bridges => bridges
                .iter()
                .enumerate()
                .map(|(n, bridge)| bridge_config(n, bridge, &ipam))
                .collect(),
        };
        for (n, config) in configs.iter().enumerate() {
            let path = conf_dir.join(format!("1{n}-clh-test.conflist"));
            fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// From the next (re)start on, pods get `count` (1 or 2) dual-stack
    /// bridge networks (eth0, eth1; bridges of this instance's own,
    /// removed at stop) instead of the loopback-only one. Returns the
    /// bridges' names.
    pub fn use_bridge_networks(&mut self, count: usize) -> Result<Vec<String>> {
        ensure!(
            (1..=MAX_NETWORKS).contains(&count),
            "1 to {MAX_NETWORKS} networks"
        );
        self.cni_bridges = (0..count)
            .map(|n| format!("clhbr{}x{n}", std::process::id() % 100_000))
            .collect();
        Ok(self.cni_bridges.clone())
    }

    /// Deletes the bridges the CNI plugin made (it leaves them when the
    /// last pod goes).
    pub(super) fn remove_bridge(&self) -> Result<()> {
        for bridge in &self.cni_bridges {
            if !Path::new("/sys/class/net").join(bridge).exists() {
                continue;
            }
            let status = std::process::Command::new("ip")
                .args(["link", "delete", bridge])
                .status()
                .context("running ip link delete")?;
            if !status.success() {
                bail!("ip link delete {bridge}: {status}");
            }
        }
        Ok(())
    }

    /// The cgroup (cgroupfs path) under which tests put their pods'
    /// cgroups, as a kubelet's `kubepods`: unique to this instance, and
    /// removed by [`stop`](Self::stop) in every hierarchy.
    pub fn cri_cgroup_root(&self) -> String {
        format!("/clh-test-{}", self.namespace)
    }

    /// Where the CRI plugin mounts the pods' network namespaces
    /// (`netns_mounts_under_state_dir`), instead of the host's /var/run/netns.
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.join("state/io.containerd.grpc.v1.cri/netns")
    }

    /// The runc root of CRI containers run by the runc handler.
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// The shims' processes (command lines naming our socket).
    pub fn shims(&self) -> Vec<i32> {
        self.shim_pids()
    }

    /// The Unix sockets the running shims listen on (containerd 2.x puts
    /// them in the host-global /run/containerd/s); a test notes them while
    /// its pods run, to check afterwards that none was left.
    pub fn shim_sockets_now(&self) -> Vec<PathBuf> {
        let mut sockets: Vec<PathBuf> = self
            .shim_pids()
            .into_iter()
            .flat_map(listening_sockets)
            .collect();
        sockets.sort();
        sockets.dedup();
        sockets
    }

    /// Stops containerd with SIGTERM, as a service manager would, and
    /// starts it again on the same config, root and state; the shims keep
    /// running and containerd reconnects to them. Fails if containerd does
    /// not exit on SIGTERM within its stop timeout (it is then killed).
    pub fn restart(&mut self) -> Result<()> {
        self.restart_with(|| {})
    }

    /// [`restart`](Self::restart), running `stopped` once containerd has
    /// exited and before it starts again (also when it had to be killed).
    pub fn restart_with(&mut self, stopped: impl FnOnce()) -> Result<()> {
        let mut stopped = Some(stopped);
        let mut run_stopped = || {
            if let Some(f) = stopped.take() {
                f();
            }
        };
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id())?);
            kill(pid, Signal::SIGTERM).context("sending SIGTERM to containerd")?;
            if wait_deadline(&mut child, STOP_TIMEOUT)?.is_none() {
                let _ = child.kill();
                let _ = child.wait();
                run_stopped();
                bail!(
                    "containerd did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    self.log_tail(40)
                );
            }
        }
        run_stopped();
        self.spawn()
    }
}
