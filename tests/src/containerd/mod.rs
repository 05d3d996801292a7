//! A private containerd per test, never the system's.
//!
//! Each [`PrivateContainerd`] owns a short temp dir `/tmp/ctd-XXXXXX` (unix
//! socket paths are limited to 108 bytes, and shims put sockets next to the
//! address) holding root, state, socket, config and log, and its own
//! containerd namespace named after that dir, so that instances running in
//! parallel share no runc state dirs or cgroups. Stopping it removes
//! everything it made: tasks, shims and their descendants, mounts, the
//! namespace's cgroups and runc state, the temp dir.
//!
//! The CRI plugin is set up as on a node (cri.rs): pinned pause image, a
//! loopback-only CNI network, and inside the temp dir the network
//! namespaces and the runc state of CRI containers (whose containerd
//! namespace is the shared `k8s.io`); pods' cgroups go under a cgroup root
//! named after the instance.
//!
//! Binaries come from `packaging/install-containerd.sh`: containerd 1.6 from
//! Debian 12 in /usr/bin, containerd 1.7 (Debian 13) and 2.1 (Debian forky)
//! unpacked under the cache dir.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod cri;
mod events;
mod leaks;
mod procs;

pub use cri::{
    BRIDGE_GATEWAY_V4, BRIDGE_GATEWAY_V6, BRIDGE_SUBNET_V4, BRIDGE_SUBNET_V6, CNI_BIN_DIR,
    CRI_NAMESPACE, SANDBOX_IMAGE,
};
pub use events::EventWatch;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procs::*;
pub use procs::{all_pids, check, cmdline, descendants, run_with_timeout};

/// How long containerd may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long containerd may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for one `ctr` command.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// Polling interval for deadlines (socket, child exit).
const POLL: Duration = Duration::from_millis(20);

/// The CRI registration of the `clh` handler shipped in packaging/; the
/// harness embeds these very files so that the tests prove they load.
const CLH_SNIPPET_V3: &str = include_str!("../../../packaging/containerd/containerd-2.x-clh.toml");
const CLH_SNIPPET_V2: &str = include_str!("../../../packaging/containerd/containerd-1.x-clh.toml");

/// Plugins that cannot work here or would touch host-global paths: other
/// snapshotters (no btrfs/zfs/devmapper/block devices), NRI (its socket is
/// host-global, /var/run/nri), tracing exporters. Unknown names are ignored
/// by both versions.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.nri.v1.nri",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// Where the runc shim keeps runc state (its default `Root`), per namespace.
const RUNC_ROOT: &str = "/run/containerd/runc";

/// Which containerd binary set to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// containerd 2.1.x from the cache dir, config version 3.
    V2,
    /// containerd 1.6 from Debian 12 (/usr/bin), config version 2.
    V1_6,
    /// containerd 1.7.x from Debian 13 (trixie), unpacked in the cache dir,
    /// config version 2.
    V1_7,
}

impl ContainerdVersion {
    /// Directory holding containerd, ctr and containerd-shim-runc-v2.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            ContainerdVersion::V1_6 => PathBuf::from("/usr/bin"),
            ContainerdVersion::V1_7 => cache_dir().join("containerd-1.7/usr/bin"),
            ContainerdVersion::V2 => cache_dir().join("containerd-2.x/usr/bin"),
        }
    }

    /// The shipped snippet registering the `clh` runtime, without its
    /// `version` line (the generated config has its own).
    fn clh_snippet(self) -> String {
        let text = match self {
            ContainerdVersion::V2 => CLH_SNIPPET_V3,
            ContainerdVersion::V1_6 | ContainerdVersion::V1_7 => CLH_SNIPPET_V2,
        };
        text.lines()
            .filter(|l| !l.trim_start().starts_with("version"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A complete config for a private instance living in `dir`, with the
    /// `clh` handler registered as packaging/ ships it.
    fn config(self, dir: &Path, socket: &Path) -> String {
        self.config_with(dir, socket, &self.clh_snippet())
    }

    /// [`config`](Self::config) with `snippet` as the extra CRI tables
    /// (none: a node's config before clh-install ran).
    fn config_with(self, dir: &Path, socket: &Path, snippet: &str) -> String {
        let d = dir.display();
        let disabled = DISABLED_PLUGINS
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // The opt plugin would otherwise write to /opt/containerd; CNI
        // configs are read from our dir so the host's never apply. The CRI
        // section (`cri`) is in cri.rs.
        let (version, opt) = match self {
            ContainerdVersion::V2 => (3, "[plugins.'io.containerd.internal.v1.opt']"),
            ContainerdVersion::V1_6 | ContainerdVersion::V1_7 => {
                (2, "[plugins.\"io.containerd.internal.v1.opt\"]")
            }
        };
        format!(
            "version = {version}\n\
             root = \"{d}/root\"\n\
             state = \"{d}/state\"\n\
             disabled_plugins = [{disabled}]\n\n\
             [grpc]\n  address = \"{sock}\"\n\n\
             {opt}\n  path = \"{d}/opt\"\n\n\
             {cri}\n",
            sock = socket.display(),
            cri = self.cri_config(dir, snippet),
        )
    }
}

/// `${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}`, as packaging/install-containerd.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLH_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/clh-shim")
}

/// A containerd daemon private to one test.
pub struct PrivateContainerd {
    version: ContainerdVersion,
    dir: PathBuf,
    socket: PathBuf,
    namespace: String,
    path_env: String,
    /// More environment for containerd, which its shims inherit (e.g.
    /// `CLH_SHIM_CONFIG`).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The bridges of [`PrivateContainerd::use_bridge_networks`], removed
    /// at stop; none: the loopback-only network.
    cni_bridges: Vec<String>,
    /// Shim sockets found on shims that had to be killed, removed at stop.
    shim_sockets: Vec<PathBuf>,
    /// A config file the test owns (a node's, edited by clh-install),
    /// used as it is instead of the generated one.
    node_config: Option<PathBuf>,
    stopped: bool,
}

/// Makes a node's containerd config: given the instance dir and the
/// generated config without the `clh` handler, writes the node's file
/// (and installs clh-shim into it), returning its path.
pub type NodeConfig<'a> = &'a dyn Fn(&Path, &str) -> Result<PathBuf>;

impl PrivateContainerd {
    /// Starts containerd `version` with `shim_dir` (where
    /// `containerd-shim-clh-v2` is) first on its PATH, then the runc shim of
    /// that version, then the system PATH; returns once its socket answers.
    pub fn start(version: ContainerdVersion, shim_dir: Option<&Path>) -> Result<Self> {
        Self::start_with_env(version, shim_dir, &[])
    }

    /// [`PrivateContainerd::start`] with `env` added to containerd's
    /// environment (its shims inherit it).
    pub fn start_with_env(
        version: ContainerdVersion,
        shim_dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_in(version, shim_dir, env, Path::new("/tmp"))
    }

    /// [`PrivateContainerd::start_with_env`] with its temp dir in `parent`
    /// (keep it short: socket paths).
    pub fn start_in(
        version: ContainerdVersion,
        shim_dir: Option<&Path>,
        env: &[(&str, &str)],
        parent: &Path,
    ) -> Result<Self> {
        let mut me = Self::create(version, shim_dir, env, parent)?;
        // On error `me` is dropped, which cleans up whatever was started.
        me.spawn()?;
        Ok(me)
    }

    /// Starts containerd `version` from a node's config: `node` writes it
    /// (see [`NodeConfig`]); nothing puts the shim on containerd's PATH.
    pub fn start_node(
        version: ContainerdVersion,
        env: &[(&str, &str)],
        node: NodeConfig<'_>,
    ) -> Result<Self> {
        let mut me = Self::create(version, None, env, Path::new("/tmp"))?;
        let base = version.config_with(&me.dir, &me.socket, "");
        me.node_config = Some(node(&me.dir, &base)?);
        me.spawn()?;
        Ok(me)
    }

    fn create(
        version: ContainerdVersion,
        shim_dir: Option<&Path>,
        env: &[(&str, &str)],
        parent: &Path,
    ) -> Result<Self> {
        let bin = version.bin_dir();
        for b in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            if !bin.join(b).is_file() {
                bail!(
                    "{} missing: run packaging/install-containerd.sh",
                    bin.join(b).display()
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("ctd-")
            .tempdir_in(parent)
            .context("creating the containerd temp dir")?
            .keep();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let socket = dir.join("c.sock");
        let mut path_env = Vec::new();
        if let Some(s) = shim_dir {
            path_env.push(s.display().to_string());
        }
        path_env.push(bin.display().to_string());
        path_env
            .push(std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
        Ok(PrivateContainerd {
            version,
            socket,
            // Lowercase letters, digits and '-' only: valid as namespace.
            namespace: name.to_lowercase().replace('_', "-"),
            path_env: path_env.join(":"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
            child: None,
            cni_bridges: Vec::new(),
            shim_sockets: Vec::new(),
            node_config: None,
            stopped: false,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let config = self.config_path();
        if self.node_config.is_none() {
            fs::write(&config, self.version.config(&self.dir, &self.socket))?;
        }
        self.write_cni_config()?;
        // Appending: a restart keeps the log of the previous run.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(self.version.bin_dir().join("containerd"))
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("debug")
            .env("PATH", &self.path_env)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "containerd exited at start ({status}):\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd socket {} not up within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The gRPC socket path.
    pub fn address(&self) -> &Path {
        &self.socket
    }

    /// The containerd namespace this instance's helpers use (unique).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The temp dir holding root, state, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    pub fn config_path(&self) -> PathBuf {
        match &self.node_config {
            Some(path) => path.clone(),
            None => self.dir.join("config.toml"),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// `containerd config dump` of this instance's config: what it runs
    /// with once defaults and imports are merged.
    pub fn config_dump(&self) -> Result<String> {
        let mut cmd = Command::new(self.version.bin_dir().join("containerd"));
        cmd.arg("--config")
            .arg(self.config_path())
            .args(["config", "dump"]);
        let out = run_with_timeout(cmd, CTR_TIMEOUT)?;
        check(&out, "containerd config dump")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The last `n` lines of containerd's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `ctr --address <sock> --namespace <ns> args...` with [`CTR_TIMEOUT`].
    pub fn ctr<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.ctr_in(&self.namespace, args, CTR_TIMEOUT)
    }

    /// `ctr` in namespace `ns` with a time limit; killed when it runs over.
    pub fn ctr_in<S: AsRef<std::ffi::OsStr>>(
        &self,
        ns: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut args: Vec<std::ffi::OsString> =
            args.iter().map(|a| a.as_ref().to_owned()).collect();
        // ctr keeps task IO fifos in the host-global /run/containerd/fifo and
        // leaves them there for detached tasks: keep them in our dir.
        let fifo_at = match args.first().and_then(|a| a.to_str()) {
            Some("run") => Some(1),
            Some("tasks" | "task" | "t") => match args.get(1).and_then(|a| a.to_str()) {
                Some("start" | "exec") => Some(2),
                _ => None,
            },
            _ => None,
        };
        if let Some(at) = fifo_at {
            args.insert(at, "--fifo-dir".into());
            args.insert(at + 1, self.dir.join("fifo").into());
        }
        let mut cmd = Command::new(self.version.bin_dir().join("ctr"));
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(ns)
            .args(&args)
            .env("PATH", &self.path_env);
        run_with_timeout(cmd, timeout)
    }

    /// Imports an OCI image tarball into our namespace and checks `name`
    /// is then listed.
    pub fn import_image(&self, tar: &Path, name: &str) -> Result<()> {
        self.import_image_in(&self.namespace, tar, name)
    }

    /// [`import_image`](Self::import_image) into namespace `ns` (the CRI
    /// plugin's is `k8s.io`).
    pub fn import_image_in(&self, ns: &str, tar: &Path, name: &str) -> Result<()> {
        let tar = tar.display().to_string();
        // The tarball names the image (io.containerd.image.name annotation),
        // which 1.6 and 2.x both honour without flags. (For a tarball with
        // only the OCI ref name, the tag, `--base-name <repo>` works in both;
        // `--index-name` names the index, and 1.6 then also adds an
        // `import-<date>` image.)
        let out = self.ctr_in(ns, &["images", "import", &tar], CTR_TIMEOUT)?;
        check(&out, "ctr images import")?;
        let out = self.ctr_in(ns, &["images", "ls", "-q"], CTR_TIMEOUT)?;
        check(&out, "ctr images ls")?;
        let listed = String::from_utf8_lossy(&out.stdout);
        if !listed.lines().any(|l| l.trim() == name) {
            bail!("image {name} not listed in {ns} after importing {tar}: {listed}");
        }
        Ok(())
    }

    /// Stops everything this instance started; idempotent. Tasks are killed
    /// and deleted through containerd first (so shims clean up after
    /// themselves), then containerd gets SIGTERM (SIGKILL after a
    /// deadline), then leftover shims and their descendants are killed, then
    /// mounts, cgroups, runc state and the temp dir are removed.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut errors = Vec::new();
        if self.child.is_some() {
            if let Err(e) = self.delete_all_tasks() {
                errors.push(format!("deleting tasks: {e:#}"));
            }
        }
        if let Some(mut child) = self.child.take() {
            if let Err(e) = terminate(&mut child, STOP_TIMEOUT) {
                errors.push(format!("stopping containerd: {e:#}"));
            }
        }
        // containerd deliberately leaves shims running when it exits.
        let shims = self.shim_pids();
        let mut doomed = Vec::new();
        for &pid in &shims {
            self.shim_sockets.extend(listening_sockets(pid));
            doomed.extend(descendants(pid));
        }
        for pid in shims.iter().chain(doomed.iter()) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        wait_gone(shims.iter().chain(doomed.iter()).copied(), STOP_TIMEOUT);
        for s in &self.shim_sockets {
            let _ = fs::remove_file(s);
        }
        if let Err(e) = self.unmount_all() {
            errors.push(format!("unmounting: {e:#}"));
        }
        if let Err(e) = self.remove_bridge() {
            errors.push(format!("removing the CNI bridge: {e:#}"));
        }
        for dir in self.namespace_dirs() {
            if let Err(e) = remove_tree(&dir) {
                errors.push(format!("removing {}: {e:#}", dir.display()));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            errors.push(format!("removing {}: {e}", self.dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }

    /// Kills containerd alone with SIGKILL, as a crash would: shims and
    /// containers keep running; [`stop`](Self::stop) still cleans them up.
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills and deletes every task of every namespace, bounded in time.
    fn delete_all_tasks(&self) -> Result<()> {
        let t = Duration::from_secs(15);
        let out = self.ctr_in(&self.namespace, &["namespaces", "ls", "-q"], t)?;
        check(&out, "ctr namespaces ls")?;
        for ns in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let out = self.ctr_in(ns, &["tasks", "ls", "-q"], t)?;
            check(&out, "ctr tasks ls")?;
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let out = self.ctr_in(ns, &["tasks", "delete", "--force", id], t)?;
                check(&out, "ctr tasks delete")?;
            }
        }
        Ok(())
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd {:?} log tail ({}):\n{}",
                self.version,
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("PrivateContainerd cleanup: {e:#}");
        }
    }
}
