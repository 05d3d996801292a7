//! containerd's `start` and the shim daemon that serves the Task service,
//! as every containerd since 1.6 understands them.
//!
//! `start` reads what containerd sent (bootstrap.rs: containerd 2.3's
//! `BootstrapParams` or the legacy flags, environment and runtime options)
//! and answers in the same protocol: a `BootstrapResult` of task API v3 to
//! 2.3, the bare address (task API v2) to 1.6 to 2.2. The daemon serves the
//! Task service under both names, `containerd.task.v2.Task` and
//! `containerd.task.v3.Task` (the same messages; only the package differs).
//! `delete` stays with the crate's bootstrap; `-info` is main.rs's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use containerd_shim::asynchronous::Shim;
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::r#async::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bootstrap::{self, LegacyEnv};
use crate::logging;
use crate::pod::Role;
use crate::shim::ClhShim;

/// containerd's name for this runtime.
pub const RUNTIME_ID: &str = "io.containerd.clh.v2";

const TASK_V3: &str = "containerd.task.v3.Task";
const TASK_V2: &str = "containerd.task.v2.Task";

/// How long the daemon may take to serve (it boots no VM before Create).
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the pod's shim may take to accept a connection.
const SANDBOX_SHIM_TIMEOUT: Duration = Duration::from_secs(5);

/// `start`: prints the address of the shim that serves the container. A
/// pod's containers go to the shim of their sandbox (one shim and one VM
/// per pod); a sandbox or a standalone container gets a new daemon, printed
/// once it serves. containerd runs `start` in the container's bundle and
/// reads our stdout and stderr as one reply: nothing but the reply is
/// written on success (a warning goes to the bundle's `log` FIFO).
pub async fn start(flags: &Flags) -> anyhow::Result<()> {
    let input = bootstrap::read_stdin()?;
    let start = bootstrap::parse_start(&input, flags, &LegacyEnv::from_env())?;
    // Before anything is created: a broken configuration fails the
    // container's creation with the file and key named (containerd shows
    // our stderr), instead of running it on defaults.
    let loaded = clh_config::Config::load_default();
    if let Ok((config, _)) = &loaded {
        let level = logging::effective_level(config.runtime.log_level, flags.debug);
        logging::init_start(origin(flags), level);
    }
    crate::shim::service_config(loaded)?;
    // An unreadable or odd spec is Create's to report, with its reason.
    let role = Role::of_bundle(Path::new(".")).unwrap_or(Role::Standalone);
    let address = match role {
        Role::Container { sandbox_id } => sandbox_shim(&start.opts, &sandbox_id).await?,
        Role::Standalone | Role::Sandbox => spawn_daemon(&start.opts).await?,
    };
    // `delete` after a crash finds the socket here (containerd 2.3 may
    // have put it in a directory of its choosing).
    if let Err(e) = std::fs::write("address", &address) {
        start_log(&format!("cannot write the address file in the bundle: {e}"));
    }
    let reply = bootstrap::start_reply(start.protocol, &address)?;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&reply).await?;
    stdout.flush().await?;
    Ok(())
}

/// A warning during `start`, where stdout and stderr are the reply: to the
/// bundle's `log` FIFO, which containerd copies into its own log; dropped
/// when there is none or nobody reads it.
fn start_log(msg: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open("log");
    if let Ok(mut fifo) = fifo {
        let _ = writeln!(fifo, "level=warning msg=\"{}\"", msg.replace('"', "'"));
    }
}

/// The address of the running shim of pod sandbox `sandbox_id`.
async fn sandbox_shim(opts: &StartOpts, sandbox_id: &str) -> anyhow::Result<String> {
    crate::vm::validate_id(sandbox_id)?;
    let address = opts.socket_address(sandbox_id);
    let path = address.trim_start_matches("unix://").to_string();
    let connect = tokio::net::UnixStream::connect(&path);
    match tokio::time::timeout(SANDBOX_SHIM_TIMEOUT, connect).await {
        Ok(Ok(_)) => Ok(address),
        Ok(Err(e)) => bail!(
            "pod sandbox {sandbox_id} has no running io.containerd.clh.v2 shim ({path}: {e}); run the pod's sandbox with the same runtime handler before its containers"
        ),
        Err(_) => bail!(
            "the shim of pod sandbox {sandbox_id} did not accept a connection within {SANDBOX_SHIM_TIMEOUT:?}"
        ),
    }
}

/// Re-executes this binary as the daemon, on the socket in the directory
/// containerd asked for (2.3) or the default one, with containerd's TTRPC
/// address in its environment (it inherits the rest of containerd's:
/// CLH_SHIM_CONFIG), and waits, bounded, for it to close its stdout, which
/// it does once it serves. Its OOM score is raised above ours like
/// containerd's own shims; a refusal (no CAP_SYS_RESOURCE) is only a
/// warning.
async fn spawn_daemon(opts: &StartOpts) -> anyhow::Result<String> {
    let address = opts.socket_address(&opts.id);
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.current_dir(std::env::current_dir()?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .env("TTRPC_ADDRESS", &opts.ttrpc_address)
        .args(["-namespace", &opts.namespace, "-id", &opts.id])
        .args(["-address", &opts.address, "-socket", &address]);
    if opts.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd.spawn().context("cannot spawn the shim daemon")?;
    if let Some(pid) = child.id() {
        if let Err(e) = containerd_shim::cgroup::adjust_oom_score(pid) {
            start_log(&format!("cannot raise the shim's oom_score_adj: {e}"));
        }
    }
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut sink = Vec::new();
    let served = tokio::time::timeout(DAEMON_START_TIMEOUT, stdout.read_to_end(&mut sink)).await;
    if served.is_err() {
        let _ = child.start_kill();
        bail!("the shim daemon did not serve within {DAEMON_START_TIMEOUT:?}");
    }
    if let Some(status) = child.try_wait()? {
        bail!("the shim daemon exited at start ({status}); see containerd's log");
    }
    Ok(address)
}

/// The daemon: the Task service on `flags.socket` under both names, until
/// Shutdown (or SIGTERM/SIGINT).
pub async fn serve(runtime_id: &str, flags: &Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("-socket is required");
    }
    // Checked again: the file may have changed since `start`. The log
    // comes first, so that a broken file is reported there too.
    let loaded = clh_config::Config::load_default();
    let runtime = match &loaded {
        Ok((config, _)) => config.runtime.clone(),
        Err(_) => clh_config::RuntimeConfig::default(),
    };
    let level = logging::effective_level(runtime.log_level, flags.debug);
    logging::init_daemon(origin(flags), level, &runtime.state_dir);
    let (_, service_config) = crate::shim::service_config(loaded)?;
    let mut config = Config::default();
    let mut shim = ClhShim::new(runtime_id, flags, &mut config).await;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    // Events go through a queue that (re)connects to containerd as needed:
    // it may restart while we serve (service/events.rs).
    let task: Arc<dyn Task + Send + Sync> =
        Arc::new(shim.task_service(&ttrpc_address, service_config));
    let mut services = create_task(task.clone());
    if let Some(v3) = create_task(task).remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), v3);
    }
    let path = flags.socket.trim_start_matches("unix://");
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let mut server = Server::new()
        .bind(&flags.socket)
        .with_context(|| format!("cannot listen on {}", flags.socket))?
        .register_service(services);
    // Bound under our umask (077); made exactly 0600 like containerd's own
    // shim sockets. The shim API is root's only (CVE-2020-15257).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {path} owner-only"))?;
    server
        .start()
        .await
        .context("cannot start the ttrpc server")?;
    tracing::info!(socket = %flags.socket, pid = std::process::id(), log_level = level.as_str(), "shim serving");
    // The parent (`start`) reads our stdout until EOF: close it now.
    nix::unistd::dup2_stdout(std::io::stderr()).context("cannot close stdout")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = shim.wait() => {}
        _ = term.recv() => {
            tracing::info!("SIGTERM: stopping every VM");
            shim.request_exit();
            shim.wait().await;
        }
    }
    if let Err(e) = server.shutdown().await {
        tracing::warn!(error = %e, "ttrpc server shutdown");
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// The fields every log line of this shim carries.
pub fn origin(flags: &Flags) -> logging::Origin {
    logging::Origin {
        runtime: RUNTIME_ID.to_string(),
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
    }
}
