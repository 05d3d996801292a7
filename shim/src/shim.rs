//! The `Shim` of containerd-shim's bootstrap: `start` spawns the daemon,
//! `delete` cleans up after a crashed one, the daemon serves the Task
//! service.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
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

pub struct ClhShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
    service: std::sync::OnceLock<Arc<TaskService<RemoteEventSender>>>,
}

/// The configuration ($CLH_SHIM_CONFIG or the default path), as the
/// service needs it.
fn load_config() -> Result<(clh_config::Config, ServiceConfig), ShimError> {
    let (config, _) = clh_config::Config::load_default()
        .map_err(|e| ShimError::InvalidArgument(format!("configuration: {e:#}")))?;
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
            exit: Arc::new(ExitSignal::default()),
            service: std::sync::OnceLock::new(),
        }
    }

    /// One shim per container: the grouping is the container id.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        let grouping = opts.id.clone();
        let vars: Vec<(&str, &str)> = Vec::new();
        spawn(opts, &grouping, vars).await
    }

    /// After a crashed daemon: for a VM's owner, kill what `state.json`
    /// recorded, unmount the shared directory and remove the VM directory;
    /// for a pod container, unmount its rootfs and binds in the pod's VM
    /// directory. Prints only the DeleteResponse (the bootstrap writes it).
    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let (_, cfg) = load_config()?;
        // containerd runs `delete` in the bundle.
        let spec = pod::bundle_spec(std::path::Path::new(".")).unwrap_or_default();
        let role = Role::of_spec(&spec).unwrap_or(Role::Standalone);
        let cleaned = match &role {
            Role::Container { sandbox_id } => {
                vm::cleanup_container_leftovers(&cfg.state_dir, sandbox_id, &self.id)
            }
            Role::Standalone | Role::Sandbox => vm::cleanup_leftovers(&cfg.state_dir, &self.id),
        };
        if let Err(e) = cleaned {
            tracing::warn!(error = format!("{e:#}"), "cleanup after a crashed shim");
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
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let events = RemoteEventSender::new(publisher, &self.namespace);
        let cfg = match load_config() {
            Ok((_, cfg)) => cfg,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the configuration; every Create will fail");
                ServiceConfig {
                    state_dir: PathBuf::from("/run/clh-shim"),
                    vm: VmOptions::from_config(
                        &clh_config::Config::default(),
                        &host::KvmFlavour::detect(),
                    )
                    .0,
                    cgroup: CgroupVersion::of_host(),
                    sizing: SizingPolicy::from_config(
                        &clh_config::Config::default().guest,
                        sizing::host_cpus(),
                    ),
                }
            }
        };
        let svc = Arc::new(TaskService::new(cfg, events, self.exit.clone()));
        let _ = self.service.set(svc.clone());
        TaskAdapter::new(svc)
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
