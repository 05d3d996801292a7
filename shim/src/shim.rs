//! The `Shim` of containerd-shim's bootstrap, for what `main` leaves to
//! it: `delete` after a crashed daemon; and the configuration every
//! action loads. `start` and serving are daemon.rs's.

use std::sync::Arc;

use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use crate::host;
use crate::pod::{self, Role};
use crate::pod_cgroup;
use crate::service::events::RemoteEventSender;
use crate::service::stats::CgroupVersion;
use crate::service::{ServiceConfig, TaskService};
use crate::sizing::{self, SizingPolicy};
use crate::task::TaskAdapter;
use crate::vm::{self, VmOptions};

/// How long an exiting shim waits for containerd to take its last events.
const EVENT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct ClhShim {
    id: String,
    namespace: String,
    /// containerd's socket (`-address`): the shim's own socket path is
    /// derived from it, the namespace and the id.
    containerd_address: String,
    exit: Arc<ExitSignal>,
    service: std::sync::OnceLock<Arc<TaskService<RemoteEventSender>>>,
}

/// The configuration ($CLH_SHIM_CONFIG or the default path), as the
/// service needs it. A file that cannot be read or is invalid is an error
/// naming the file and the key: the shim refuses to run rather than fall
/// back to defaults the operator did not choose.
pub fn load_config() -> Result<(clh_config::Config, ServiceConfig), ShimError> {
    service_config(clh_config::Config::load_default())
}

/// [`load_config`] on an already loaded configuration.
pub(crate) fn service_config(
    loaded: Result<(clh_config::Config, clh_config::Source), clh_config::ConfigError>,
) -> Result<(clh_config::Config, ServiceConfig), ShimError> {
    let (config, _) = loaded.map_err(|e| {
        ShimError::InvalidArgument(format!(
            "refusing to run with a broken configuration: {e:#}; fix it (or point {} at a valid file) and retry",
            clh_config::PATH_ENV
        ))
    })?;
    let kvm = host::KvmFlavour::detect();
    let (vm, reason) = VmOptions::from_config(&config, &kvm);
    tracing::info!(backend = ?vm.backend, reason, "VM backend");
    let service = ServiceConfig {
        state_dir: config.runtime.state_dir.clone(),
        vm,
        cgroup: CgroupVersion::of_host(),
        sizing: SizingPolicy::from_config(&config.guest, sizing::host_cpus()),
    };
    Ok((config, service))
}

impl ClhShim {
    /// Makes [`Shim::wait`] return (after stopping every VM).
    pub fn request_exit(&self) {
        self.exit.signal();
    }
}

#[async_trait::async_trait]
impl Shim for ClhShim {
    type T = TaskAdapter<RemoteEventSender>;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ClhShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
            service: std::sync::OnceLock::new(),
        }
    }

    /// Never called: `main` answers containerd's `start` itself
    /// (daemon.rs), because the bootstrap's legacy answer announces task
    /// API v3, which containerd 1.6 and 1.7 refuse. Refuses rather than
    /// start a second kind of daemon.
    async fn start_shim(&mut self, _opts: StartOpts) -> Result<String, ShimError> {
        Err(ShimError::InvalidArgument(
            "internal error: `start` is handled by daemon::start, not the shim bootstrap".into(),
        ))
    }

    /// After a crashed daemon, or one containerd lost ([`crate::orphan_daemon`],
    /// stopped first): for a VM's owner, kill what `state.json` recorded, unmount the shared directory and remove the VM directory;
    /// for a pod container, unmount its rootfs and binds in the pod's VM
    /// directory. Prints only the DeleteResponse (the bootstrap writes it).
    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let (_, cfg) = load_config()?;
        // containerd runs `delete` in the bundle.
        let spec = pod::bundle_spec(std::path::Path::new(".")).unwrap_or_default();
        let role = Role::of_spec(&spec).unwrap_or(Role::Standalone);
        // Where `start` put the daemon's socket: the bundle's `address`
        // file (containerd 2.3 may name the directory), else the default
        // place. A pod's containers share their sandbox's.
        let address = std::fs::read_to_string("address")
            .ok()
            .filter(|a| a.starts_with("unix:///"))
            .unwrap_or_else(|| {
                containerd_shim::socket_address(&self.containerd_address, &self.namespace, &self.id)
            });
        let socket = std::path::PathBuf::from(address.trim_start_matches("unix://"));
        if !matches!(role, Role::Container { .. }) {
            crate::orphan_daemon::stop(&socket, &self.id, cfg.vm.stop_timeout).await;
        }
        let cleaned = match &role {
            Role::Container { sandbox_id } => {
                vm::cleanup_container_leftovers(&cfg.state_dir, sandbox_id, &self.id)
            }
            Role::Standalone | Role::Sandbox => vm::cleanup_leftovers(&cfg.state_dir, &self.id),
        };
        if let Err(e) = cleaned {
            tracing::warn!(error = format!("{e:#}"), "cleanup after a crashed shim");
        }
        if !matches!(role, Role::Container { .. }) {
            // The dead daemon's API socket.
            remove_socket(&socket);
        }
        let cgroup = spec
            .pointer("/linux/cgroupsPath")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty());
        if let (Some(path), false) = (cgroup, matches!(role, Role::Container { .. })) {
            // The processes were just SIGKILLed: give them time to go.
            let wait = cfg.vm.stop_timeout;
            if let Err(e) = pod_cgroup::remove_leftover(path, wait).await {
                tracing::warn!(error = %e, "removing the pod cgroup after a crashed shim");
            }
        }
        Ok(DeleteResponse {
            exit_status: 128 + 9,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        if let Some(svc) = self.service.get() {
            svc.teardown_all().await;
            // The last exits and deletes, before the process goes.
            svc.flush_events(EVENT_FLUSH_TIMEOUT).await;
        }
    }

    /// Not reached through our `main` (daemon::serve loads the
    /// configuration before it binds and calls [`ClhShim::task_service`]);
    /// kept for the bootstrap's own serve path, which has no way to fail
    /// here, so a broken configuration ends the process instead of
    /// serving on defaults.
    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        match load_config() {
            Ok((_, cfg)) => self.task_service(&publisher.address, cfg),
            Err(e) => {
                tracing::error!(error = %e, "not serving");
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
}

impl ClhShim {
    /// The Task service on `cfg`, with events published to containerd's
    /// ttrpc address `events_address` (`TTRPC_ADDRESS`).
    pub fn task_service(
        &self,
        events_address: &str,
        cfg: ServiceConfig,
    ) -> TaskAdapter<RemoteEventSender> {
        let events = RemoteEventSender::new(events_address, &self.namespace);
        let svc = Arc::new(TaskService::new(cfg, events, self.exit.clone()));
        let _ = self.service.set(svc.clone());
        TaskAdapter::new(svc)
    }
}

/// Removes `path` if it is a socket (never anything else found there).
fn remove_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "removing the crashed shim's socket");
        }
    }
}

fn now() -> containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or_default(),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_is_removed_as_the_crashed_shims_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        remove_socket(&sock);
        assert!(!sock.exists());
        let file = dir.path().join("f");
        std::fs::write(&file, "not a socket").unwrap();
        remove_socket(&file);
        assert!(file.exists());
    }

    #[test]
    fn a_broken_configuration_is_an_error_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clh-shim.toml");
        std::fs::write(&path, "[guest]\nvcpus = 0\n").unwrap();
        let loaded =
            clh_config::Config::load(&path).map(|c| (c, clh_config::Source::File(path.clone())));
        let err = service_config(loaded).err().unwrap().to_string();
        assert!(err.contains("guest.vcpus"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("refusing to run"), "{err}");
    }
}
