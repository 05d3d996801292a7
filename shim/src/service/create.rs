//! Create: by the container's role, boot a VM (standalone, pod sandbox),
//! create the container in it (standalone, pod container), or both.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use containerd_shim_protos::api::{CreateTaskRequest, CreateTaskResponse};
use containerd_shim_protos::events::task::{TaskCreate, TaskIO};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;

use super::binds::Binds;
use super::container::{Container, Process};
use super::error::{Error, Result};
use super::events::EventSender;
use super::stdio::{self, Pumps, StdioPaths};
use super::volume_sync::{self, VolumeSync};
use super::{
    bind_options, binds, guest_writable, pod_spec, rootfs, sysctls, validate, TaskService,
};
use crate::pod::Role;
use crate::shared_mount::remove_container_dir;
use crate::sizing::{self, PodLimits};
use crate::vm::{GrowError, PodVm};
use serde_json::Value;

/// What creating a container in the guest made, undone on a later failure.
struct InGuest {
    rootfs: std::path::PathBuf,
    binds: Binds,
    synced: Vec<VolumeSync>,
    pid: u32,
    pumps: Pumps,
}

impl<E: EventSender> TaskService<E> {
    pub async fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        validate::id("container", &req.id)?;
        validate::runtime_options(req.options.as_ref())?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring from a checkpoint is not supported".into(),
            ));
        }
        let mut spec = validate::read_spec(Path::new(&req.bundle))?;
        let role = Role::of_spec(&spec).map_err(Error::InvalidArgument)?;
        let limits = spec_limits(&role, &spec)?;
        let _reservation = self.reserve(&req.id).await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let c = match &role {
            Role::Sandbox => {
                let vm = self.boot_pod(&req.id, &spec, &limits).await?;
                let pause = Process::new(vm.vmm_pid(), stdio, Pumps::default());
                Container::new(
                    &req.id,
                    &req.bundle,
                    role.clone(),
                    &vm,
                    None,
                    Binds::default(),
                    pause,
                )
            }
            Role::Standalone => {
                // Written by libcontainer in the container's namespaces;
                // checked here so that a refusal comes before the boot.
                sysctls::checked(&spec)?;
                bind_options::check_mounts(&spec)?;
                // `ctr run` makes a fresh namespace (or, with --net-host,
                // none): the VM has no NIC unless a path names one.
                let netns = match pod_spec::network_namespace(&spec) {
                    pod_spec::NetworkNamespace::Path(path) => Some(path),
                    _ => None,
                };
                let vm = self.boot_vm(&req.id, &spec, &limits, None, netns).await?;
                match create_in_guest(&vm, &req, &mut spec, &stdio).await {
                    Ok(g) => self.guest_container(&req, role.clone(), &vm, g, stdio),
                    Err(e) => {
                        if let Err(s) = vm.stop().await {
                            tracing::error!(
                                error = format!("{s:#}"),
                                "stopping the VM after a failed create"
                            );
                        }
                        return Err(e);
                    }
                }
            }
            Role::Container { sandbox_id } => {
                // Before its namespaces become the guest's.
                let own_sysctls = sysctls::take_pod_container(&mut spec)?;
                bind_options::check_mounts(&spec)?;
                let vm = self.pod_vm(sandbox_id).await?;
                self.grow_for(&vm, Some((&req.id, limits))).await?;
                if !own_sysctls.is_empty() {
                    vm.agent().apply_sysctls(&own_sysctls).await?;
                }
                pod_spec::adapt_container(&mut spec);
                let g = create_in_guest(&vm, &req, &mut spec, &stdio).await?;
                self.guest_container(&req, role.clone(), &vm, g, stdio)
            }
        };
        *c.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
        let c = Arc::new(c);
        let pid = c.with_proc("", |p| p.pid)?;
        self.admit(c).await?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            },
        )
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn guest_container(
        &self,
        req: &CreateTaskRequest,
        role: Role,
        vm: &Arc<PodVm>,
        g: InGuest,
        stdio: StdioPaths,
    ) -> Container {
        let init = Process::new(g.pid, stdio, g.pumps);
        let rootfs = Some(g.rootfs);
        let c = Container::new(&req.id, &req.bundle, role, vm, rootfs, g.binds, init);
        *c.synced.lock().unwrap_or_else(|p| p.into_inner()) = g.synced;
        c
    }

    /// Boots a pod's VM, named after the sandbox, with its hostname and
    /// the interfaces of its network namespace.
    /// Its sysctls are written in the guest before any container exists.
    async fn boot_pod(&self, id: &str, spec: &Value, limits: &PodLimits) -> Result<Arc<PodVm>> {
        let hostname = pod_spec::sandbox_hostname(spec)?;
        let netns = pod_spec::sandbox_netns(spec)?;
        let sysctls = sysctls::checked(spec)?;
        let vm = self.boot_vm(id, spec, limits, hostname, netns).await?;
        if sysctls.is_empty() {
            return Ok(vm);
        }
        if let Err(e) = vm.agent().apply_sysctls(&sysctls).await {
            if let Err(s) = vm.stop().await {
                tracing::error!(
                    error = format!("{s:#}"),
                    "stopping the VM after its sysctls failed"
                );
            }
            return Err(e.into());
        }
        Ok(vm)
    }

    /// Boots the VM `id`, sized for `limits`, its host processes in the
    /// spec's cgroup, and watches it for OOM kills.
    async fn boot_vm(
        &self,
        id: &str,
        spec: &Value,
        limits: &PodLimits,
        hostname: Option<String>,
        netns: Option<std::path::PathBuf>,
    ) -> Result<Arc<PodVm>> {
        let mut opts = self.config.vm.clone();
        opts.hostname = hostname;
        let size = sizing::vm_size(limits, &self.config.sizing);
        (opts.vcpus, opts.memory_mib) = (size.vcpus, size.memory_mib);
        opts.cgroups_path = cgroups_path(spec).map(str::to_string);
        opts.netns = netns;
        let vm = PodVm::start(id, &self.config.state_dir, &opts).await?;
        tracing::info!(
            id,
            backend = ?opts.backend,
            vcpus = opts.vcpus,
            memory_mib = opts.memory_mib,
            boot_ms = u64::try_from(vm.boot_to_agent().as_millis()).unwrap_or(u64::MAX),
            steps = vm.start_timeline().summary(),
            dir = %vm.dir().display(),
            "VM started"
        );
        // Metrics are for operators: a pod runs without them.
        if let Err(e) = crate::metrics::serve(&vm, crate::metrics::PodLabels::from_spec(spec)) {
            tracing::warn!(id, error = %e, "the pod's metrics socket is off");
        }
        let oom = super::oom::watch(
            Arc::downgrade(&vm),
            self.containers.clone(),
            self.events.clone(),
        );
        vm.track(tokio::spawn(oom));
        Ok(vm)
    }

    /// Grows the pod's VM when its containers' limits (with `new`, a
    /// container's limits that are not recorded yet) no longer fit.
    pub(super) async fn grow_for(&self, vm: &PodVm, new: Option<(&str, PodLimits)>) -> Result<()> {
        let mut all: Vec<PodLimits> = self
            .containers
            .lock()
            .await
            .values()
            .filter(|c| c.vm.id() == vm.id() && !c.is_pause())
            .filter(|c| new.as_ref().is_none_or(|(id, _)| c.id != *id))
            .map(|c| *c.limits.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        all.extend(new.map(|(_, l)| l));
        let sum: PodLimits = all.into_iter().sum();
        let Some(target) = sizing::grow_to(vm.size(), &sum, &self.config.sizing) else {
            return Ok(());
        };
        match vm.grow(target).await {
            Ok(now) => {
                tracing::info!(pod = %vm.id(), vcpus = now.vcpus, memory_mib = now.memory_mib, "VM resized");
                Ok(())
            }
            // QEMU: the containers' limits still hold in the guest, they
            // just compete for less.
            Err(GrowError::Resize(clh_hypervisor::Error::Unsupported(what))) => {
                tracing::warn!(pod = %vm.id(), what, "the VM cannot grow; its containers share its current size");
                Ok(())
            }
            Err(GrowError::Online(e)) => Err(e.into()),
            Err(e) => Err(Error::Internal(
                anyhow::Error::new(e).context(format!("growing the VM of {} to {target}", vm.id())),
            )),
        }
    }

    /// The running VM of pod sandbox `id`.
    async fn pod_vm(&self, id: &str) -> Result<Arc<PodVm>> {
        let pause = self.containers.lock().await.get(id).cloned();
        let vm = match pause {
            Some(p) if p.is_pause() => p.vm.clone(),
            _ => {
                return Err(Error::NotFound(format!(
                    "pod sandbox {id} is not served by this shim: create the sandbox (pause) container first, through the same runtime handler"
                )))
            }
        };
        if vm.is_dead() {
            return Err(Error::FailedPrecondition(format!(
                "the VM of pod sandbox {id} has exited; remove the pod and create it again"
            )));
        }
        Ok(vm)
    }
}

/// Mounts the rootfs and the bind mounts into the VM's shared directory,
/// creates the container in the guest and attaches its stdio. On failure
/// everything made here is undone; the VM is left to the caller.
async fn create_in_guest(
    vm: &PodVm,
    req: &CreateTaskRequest,
    spec: &mut serde_json::Value,
    stdio: &StdioPaths,
) -> Result<InGuest> {
    // Before rewrite_root replaces it with the guest path.
    let source = rootfs::source_dir(spec, Path::new(&req.bundle));
    rootfs::check_source(&req.rootfs, &source)?;
    validate::rewrite_root(spec, &req.id)?;
    let rootfs = rootfs::host_path(vm.dir(), &req.id);
    let mut binds = Binds::default();
    let mut synced = Vec::new();
    let mut created = false;
    let result = async {
        rootfs::mount(&req.rootfs, &source, &rootfs).await?;
        // Before any sync starts: this container's own read-write mounts
        // count as guest-writable too.
        guest_writable::record_writable(spec, vm.writable());
        synced = sync_volumes(vm, spec, &req.id).await?;
        let guest_sources: Vec<String> = synced.iter().map(|s| s.guest_dir().to_string()).collect();
        let bundle = Path::new(&req.bundle);
        binds = Binds::share(spec, vm.dir(), &req.id, bundle, &guest_sources)?;
        let oci_spec = serde_json::to_vec(spec).context("serializing the OCI spec")?;
        let created_in_guest = vm
            .agent()
            .create_container(&req.id, &oci_spec, stdio.wire());
        let pid = match created_in_guest.await {
            Ok(pid) => pid,
            Err(e) => {
                // Unanswered: the agent may build it all the same. It
                // removes what nobody waits for; a removal makes sure.
                created = e.is_timeout() || e.is_disconnected();
                return Err(e.into());
            }
        };
        created = true;
        let pumps = stdio::attach(vm.vsock_socket(), &req.id, "", stdio).await?;
        Ok::<_, Error>((pid, pumps))
    }
    .await;
    match result {
        Ok((pid, pumps)) => Ok(InGuest {
            rootfs,
            binds,
            synced,
            pid,
            pumps,
        }),
        Err(e) => {
            if created {
                remove_in_guest(vm, &req.id).await;
            }
            for s in synced {
                s.stop().await;
            }
            if let Err(u) = binds.unmount() {
                tracing::error!(error = %u, "after a failed create");
            }
            if let Err(u) = rootfs::unmount(&rootfs) {
                tracing::error!(error = %u, "after a failed create");
            }
            if let Err(e) = remove_container_dir(vm.dir(), &req.id) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "removing the container's directory"
                );
            }
            Err(e)
        }
    }
}

/// Starts a [`VolumeSync`] for every read-only bind mount that is a kubelet
/// atomic-writer volume (ConfigMap, Secret, projected, downward API) the
/// pod's guest cannot write ([`volume_sync::should_sync`]) and points the
/// mount at the guest's copy. Each sync has pushed its first snapshot when
/// this returns.
async fn sync_volumes(vm: &PodVm, spec: &mut Value, cid: &str) -> Result<Vec<VolumeSync>> {
    let mut synced = Vec::new();
    let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(synced);
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        let source = m.get("source").and_then(|s| s.as_str()).unwrap_or_default();
        if !binds::is_bind(m)
            || !volume_sync::should_sync(
                Path::new(source),
                bind_options::is_readonly(m),
                vm.writable(),
            )
        {
            continue;
        }
        let host = std::path::PathBuf::from(source);
        let writable = vm.writable().clone();
        match volume_sync::start(vm.agent().clone(), host, cid, n, writable).await {
            Ok(sync) => {
                // Its options (`ro` among them) stay as they are.
                m["source"] = Value::String(sync.guest_dir().to_string());
                synced.push(sync);
            }
            Err(e) => {
                for s in synced {
                    s.stop().await;
                }
                return Err(Error::Internal(anyhow::Error::new(e).context(format!(
                    "cannot copy the volume {source} into the guest"
                ))));
            }
        }
    }
    Ok(synced)
}

/// The limits a container's spec asks for: the pod's (annotations) for a
/// sandbox, the container's own (`linux.resources`) otherwise.
pub(super) fn spec_limits(role: &Role, spec: &Value) -> Result<PodLimits> {
    match role {
        Role::Sandbox => PodLimits::from_sandbox_spec(spec),
        Role::Standalone | Role::Container { .. } => PodLimits::from_linux_resources(
            spec.pointer("/linux/resources").unwrap_or(&Value::Null),
        ),
    }
    .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// The spec's `linux.cgroupsPath`: the host cgroup for the VM's processes.
fn cgroups_path(spec: &Value) -> Option<&str> {
    spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str())
}

/// Removes the container in the guest (best effort: the VM may be gone).
pub(super) async fn remove_in_guest(vm: &PodVm, id: &str) {
    if vm.is_dead() {
        return;
    }
    match vm.agent().remove_container(id).await {
        Ok(()) => {}
        // A creation that was not answered may have made nothing.
        Err(e) if e.rpc_code() == Some(ttrpc::Code::NOT_FOUND) => {}
        Err(e) => tracing::warn!(id, error = %Error::from(e), "agent RemoveContainer"),
    }
}
