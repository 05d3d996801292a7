//! containerd's `start` and the shim daemon that serves the Task service,
//! as every containerd since 1.6 understands them.
//!
//! containerd-shim 0.12's bootstrap answers `start` with JSON announcing
//! task API v3 and serves only `containerd.task.v3.Task`; containerd 1.6
//! reads `start`'s output as a bare address and calls
//! `containerd.task.v2.Task` (the same messages under the older name). So
//! `start` prints the bare address (2.x takes it too, then speaks v2), and
//! the daemon serves the Task service under both names. `delete` and
//! `-info` stay with the crate's bootstrap.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use containerd_shim::asynchronous::Shim;
use containerd_shim::{Config, Flags};
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::r#async::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
/// once it serves. containerd runs `start` in the container's bundle.
pub async fn start(flags: &Flags) -> anyhow::Result<()> {
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
        Role::Container { sandbox_id } => sandbox_shim(flags, &sandbox_id).await?,
        Role::Standalone | Role::Sandbox => spawn_daemon(flags).await?,
    };
    if let Err(e) = std::fs::write("address", &address) {
        tracing::warn!(error = %e, "cannot write the address file in the bundle");
    }
    let mut stdout = tokio::io::stdout();
    stdout.write_all(address.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// The address of the running shim of pod sandbox `sandbox_id`.
async fn sandbox_shim(flags: &Flags, sandbox_id: &str) -> anyhow::Result<String> {
    crate::vm::validate_id(sandbox_id)?;
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, sandbox_id);
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

/// Re-executes this binary as the daemon (it inherits containerd's
/// environment: TTRPC_ADDRESS, CLH_SHIM_CONFIG) and waits, bounded, for it
/// to close its stdout, which it does once it serves. Its OOM score is
/// raised above ours like containerd's own shims; a refusal (no
/// CAP_SYS_RESOURCE) is only a warning.
async fn spawn_daemon(flags: &Flags) -> anyhow::Result<String> {
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.current_dir(std::env::current_dir()?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", &address]);
    if flags.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd.spawn().context("cannot spawn the shim daemon")?;
    if let Some(pid) = child.id() {
        if let Err(e) = containerd_shim::cgroup::adjust_oom_score(pid) {
            eprintln!("warning: cannot raise the shim's oom_score_adj: {e}");
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
