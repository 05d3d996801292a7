//! The ttrpc `Agent` service. Each handler has the same shape: trace the
//! call, validate, do the work in a domain module, map the error to a ttrpc
//! code. Handlers stay thin so this file does not grow into one big rpc.rs.

use crate::containers::{Containers, CtrError, Stats};
use crate::network::NetError;
use crate::sysinfo::{self, SysInfoError};
use crate::volumes::{VolError, Volumes};
use async_trait::async_trait;
use clh_agent_protocol::{
    CheckRequest, CheckResponse, ContainerRequest, ContainerStatsResponse, CreateContainerRequest,
    CreateContainerResponse, Empty, ExecProcessRequest, FaultRequest, GuestCpuTimes, GuestNetDev,
    IdentityRequest, ListPidsResponse, NetworkConfig, OnlineResourcesResponse, OomEvent,
    ProcessRequest, ResizeTtyRequest, SeedRandomRequest, SeedRandomResponse, SignalProcessRequest,
    StartProcessResponse, SyncVolumeRequest, SyncVolumeResponse, SysctlsRequest,
    UpdateContainerRequest, VersionRequest, VersionResponse, VolumeRequest, WaitProcessResponse,
    PROTOCOL_VERSION,
};
use tracing::{debug, info, warn};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error};

/// The agent binary's own version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct AgentService {
    pub containers: Containers,
    pub volumes: Volumes,
}

/// `e` and each of its causes, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

/// Maps a domain error to its ttrpc status (the message is its whole
/// chain of causes), logging it.
fn status(call: &str, e: CtrError) -> Error {
    let msg = chain(&e);
    debug!("{call} failed: {msg}");
    Error::RpcStatus(ttrpc::get_status(e.code(), msg))
}

fn internal_status(call: &str, e: impl std::fmt::Display) -> Error {
    let msg = format!("{call}: {e}");
    warn!("{msg}");
    Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, msg))
}

fn vol_status(call: &str, e: VolError) -> Error {
    let msg = e.to_string();
    warn!("{call} failed: {msg}");
    Error::RpcStatus(ttrpc::get_status(e.code(), msg))
}

fn net_status(e: NetError) -> Error {
    let msg = format!("ConfigureNetwork: {}", chain(&e));
    warn!("{msg}");
    Error::RpcStatus(ttrpc::get_status(e.code(), msg))
}

fn empty<T>(call: &str, r: Result<T, CtrError>) -> ttrpc::Result<Empty> {
    r.map(|_| Empty::default()).map_err(|e| status(call, e))
}

#[async_trait]
impl clh_agent_protocol::Agent for AgentService {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        if req.protocol_version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version mismatch: shim {} speaks protocol {}, agent {AGENT_VERSION} \
                 speaks protocol {PROTOCOL_VERSION}; the shim and the guest image must come \
                 from the same release",
                display_or_unknown(&req.shim_version),
                req.protocol_version,
            );
            warn!("{msg}");
            return Err(Error::RpcStatus(ttrpc::get_status(
                Code::FAILED_PRECONDITION,
                msg,
            )));
        }
        info!(shim_version = %display_or_unknown(&req.shim_version), "shim connected");
        Ok(VersionResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_owned(),
            ..Default::default()
        })
    }

    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        debug!("check");
        do_check().map_err(|e| {
            let msg = crate::error_chain(&e);
            warn!("check failed: {msg}");
            Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, msg))
        })
    }

    async fn seed_random(
        &self,
        _ctx: &TtrpcContext,
        req: SeedRandomRequest,
    ) -> ttrpc::Result<SeedRandomResponse> {
        if req.seed.is_empty() || req.seed.len() > crate::rng::MAX_SEED {
            return Err(Error::RpcStatus(ttrpc::get_status(
                Code::INVALID_ARGUMENT,
                format!(
                    "SeedRandom: a seed is 1 to {} bytes, not {}",
                    crate::rng::MAX_SEED,
                    req.seed.len()
                ),
            )));
        }
        let credited = crate::rng::credit_seed(&req.seed)
            .map_err(|e| internal_status("SeedRandom", crate::error_chain(&e)))?;
        let crng_ready = crate::rng::crng_ready();
        let entropy_avail = crate::rng::entropy_avail().unwrap_or(0);
        info!(
            credited,
            crng_ready, entropy_avail, "host entropy credited to the RNG"
        );
        Ok(SeedRandomResponse {
            credited_bytes: u32::try_from(credited).unwrap_or(u32::MAX),
            crng_ready,
            entropy_avail,
            ..Default::default()
        })
    }

    async fn set_identity(
        &self,
        _ctx: &TtrpcContext,
        req: IdentityRequest,
    ) -> ttrpc::Result<Empty> {
        crate::identity::apply(&req).map_err(|e| {
            let code = if e.is_invalid_argument() {
                Code::INVALID_ARGUMENT
            } else {
                Code::INTERNAL
            };
            Error::RpcStatus(ttrpc::get_status(
                code,
                format!("SetIdentity: {}", crate::error_chain(&e)),
            ))
        })?;
        info!(hostname = %req.hostname, "identity set");
        Ok(Empty::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        info!(id = %req.container_id, "create container");
        crate::init::ensure_shared_dir().await.map_err(|e| {
            internal_status(
                "CreateContainer: the shared directory (container rootfses)",
                crate::error_chain(&*e),
            )
        })?;
        let stdio = req.stdio.get_or_default();
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec, stdio)
            .await
            .map_err(|e| status("CreateContainer", e))?;
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, exec = %req.exec_id, "exec");
        let stdio = req.stdio.get_or_default();
        let r = (self.containers).exec(&req.container_id, &req.exec_id, &req.process, stdio);
        empty("ExecProcess", r)
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<StartProcessResponse> {
        debug!(id = %req.container_id, exec = %req.exec_id, "start");
        let pid = (self.containers)
            .start(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| status("StartProcess", e))?;
        Ok(StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        debug!(id = %req.container_id, exec = %req.exec_id, "wait");
        let exit = (self.containers)
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| status("WaitProcess", e))?;
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_ns: exit.at_ns,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, exec = %req.exec_id, req.signal, req.all, "signal");
        let r = (self.containers).signal(&req.container_id, &req.exec_id, req.signal, req.all);
        empty("SignalProcess", r)
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, exec = %req.exec_id, "resize tty");
        let r = (self.containers).resize(&req.container_id, &req.exec_id, req.width, req.height);
        empty("ResizeTty", r)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, exec = %req.exec_id, "close stdin");
        empty(
            "CloseStdin",
            (self.containers).close_stdin(&req.container_id, &req.exec_id),
        )
    }

    async fn container_stats(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ContainerStatsResponse> {
        debug!(id = %req.container_id, "stats");
        let s = (self.containers)
            .stats(&req.container_id)
            .map_err(|e| status("ContainerStats", e))?;
        Ok(stats_response(s))
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, "update");
        let r = (self.containers).update(&req.container_id, &req.resources);
        empty("UpdateContainer", r)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, "pause");
        empty(
            "PauseContainer",
            self.containers.freeze(&req.container_id, true),
        )
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, "resume");
        empty(
            "ResumeContainer",
            self.containers.freeze(&req.container_id, false),
        )
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        debug!(id = %req.container_id, "list pids");
        let pids = (self.containers)
            .list_pids(&req.container_id)
            .map_err(|e| status("ListPids", e))?;
        Ok(ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, "remove");
        empty(
            "RemoveContainer",
            self.containers.remove(&req.container_id).await,
        )
    }

    async fn sync_volume(
        &self,
        _ctx: &TtrpcContext,
        req: SyncVolumeRequest,
    ) -> ttrpc::Result<SyncVolumeResponse> {
        debug!(
            id = %req.container_id,
            volume = req.volume,
            generation = req.generation,
            entries = req.entries.len(),
            commit = req.commit,
            "sync volume"
        );
        let (dir, committed) =
            (self.volumes.sync(req).await).map_err(|e| vol_status("SyncVolume", e))?;
        Ok(SyncVolumeResponse {
            guest_dir: dir.to_string_lossy().into_owned(),
            committed_generation: committed,
            ..Default::default()
        })
    }

    async fn remove_volume(&self, _ctx: &TtrpcContext, req: VolumeRequest) -> ttrpc::Result<Empty> {
        debug!(id = %req.container_id, volume = req.volume, "remove volume");
        (self.volumes.remove(&req.container_id, req.volume).await)
            .map(|()| Empty::default())
            .map_err(|e| vol_status("RemoveVolume", e))
    }

    async fn online_resources(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<OnlineResourcesResponse> {
        let (cpus, memory_blocks) = tokio::task::spawn_blocking(|| {
            crate::hotplug::online_all(std::path::Path::new(crate::hotplug::SYSFS))
        })
        .await
        .map_err(|e| internal_status("OnlineResources", e))?
        .map_err(|e| internal_status("OnlineResources", e))?;
        info!(cpus, memory_blocks, "brought hot-plugged resources online");
        Ok(OnlineResourcesResponse {
            cpus,
            memory_blocks,
            ..Default::default()
        })
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: NetworkConfig,
    ) -> ttrpc::Result<Empty> {
        debug!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            "configure network"
        );
        (crate::network::configure(&req).await)
            .map(|()| Empty::default())
            .map_err(net_status)
    }

    async fn apply_sysctls(
        &self,
        _ctx: &TtrpcContext,
        req: SysctlsRequest,
    ) -> ttrpc::Result<Empty> {
        debug!(count = req.sysctls.len(), "apply sysctls");
        let applied = tokio::task::spawn_blocking(move || crate::sysctl::apply(&req.sysctls))
            .await
            .map_err(|e| internal_status("ApplySysctls", e))?;
        applied.map(|()| Empty::default()).map_err(|e| {
            let msg = format!("ApplySysctls: {}", chain(&e));
            warn!("{msg}");
            Error::RpcStatus(ttrpc::get_status(e.code(), msg))
        })
    }

    async fn inject_fault(&self, _ctx: &TtrpcContext, req: FaultRequest) -> ttrpc::Result<Empty> {
        warn!(fault = ?req.fault, "inject fault");
        crate::faults::inject(&req)
            .map(|()| Empty::default())
            .map_err(|e| {
                let code = match e {
                    crate::faults::FaultError::NotBuiltIn => Code::UNIMPLEMENTED,
                    crate::faults::FaultError::Unknown(_) => Code::INVALID_ARGUMENT,
                };
                Error::RpcStatus(ttrpc::get_status(code, format!("InjectFault: {e}")))
            })
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let container_id = self.containers.next_oom().await;
        Ok(OomEvent {
            container_id,
            ..Default::default()
        })
    }
}

fn stats_response(s: Stats) -> ContainerStatsResponse {
    ContainerStatsResponse {
        cpu_usage_usec: s.cpu_usage_usec,
        cpu_user_usec: s.cpu_user_usec,
        cpu_system_usec: s.cpu_system_usec,
        cpu_nr_periods: s.cpu_nr_periods,
        cpu_nr_throttled: s.cpu_nr_throttled,
        cpu_throttled_usec: s.cpu_throttled_usec,
        memory_usage_bytes: s.memory_usage_bytes,
        memory_limit_bytes: s.memory_limit_bytes,
        memory_max_usage_bytes: s.memory_max_usage_bytes,
        memory_oom_kills: s.memory_oom_kills,
        memory_anon_bytes: s.memory_anon_bytes,
        memory_file_bytes: s.memory_file_bytes,
        pids_current: s.pids_current,
        pids_limit: s.pids_limit,
        ..Default::default()
    }
}

fn do_check() -> Result<CheckResponse, SysInfoError> {
    let (mem_total_kib, mem_available_kib) = sysinfo::meminfo_kib()?;
    let mut reply = CheckResponse {
        kernel_release: sysinfo::kernel_release()?,
        boot_id: sysinfo::boot_id()?,
        uptime_ms: sysinfo::uptime_ms()?,
        agent_rss_kib: sysinfo::self_rss_kib()?,
        mem_total_kib,
        mem_available_kib,
        boot_marks: crate::boot_marks::all(),
        ..Default::default()
    };
    add_metrics(&mut reply);
    Ok(reply)
}

/// The facts Check carries for metrics only: best effort, so that a guest
/// without one of these files still passes the liveness probe.
fn add_metrics(reply: &mut CheckResponse) {
    match sysinfo::loadavg() {
        Ok((l1, l5, l15)) => (reply.load1, reply.load5, reply.load15) = (l1, l5, l15),
        Err(e) => debug!("check: {}", crate::error_chain(&e)),
    }
    match sysinfo::cpus_online() {
        Ok(n) => reply.cpus_online = n,
        Err(e) => debug!("check: {}", crate::error_chain(&e)),
    }
    match sysinfo::cpu_times_ms() {
        Ok([user, nice, system, idle, iowait, irq, softirq, steal]) => {
            reply.cpu = Some(GuestCpuTimes {
                user_ms: user,
                nice_ms: nice,
                system_ms: system,
                idle_ms: idle,
                iowait_ms: iowait,
                irq_ms: irq,
                softirq_ms: softirq,
                steal_ms: steal,
                ..Default::default()
            })
            .into();
        }
        Err(e) => debug!("check: {}", crate::error_chain(&e)),
    }
    match sysinfo::net_devs() {
        Ok(devs) => {
            reply.net = devs
                .into_iter()
                .map(|d| GuestNetDev {
                    name: d.name,
                    rx_bytes: d.rx_bytes,
                    rx_packets: d.rx_packets,
                    rx_errors: d.rx_errors,
                    rx_dropped: d.rx_dropped,
                    tx_bytes: d.tx_bytes,
                    tx_packets: d.tx_packets,
                    tx_errors: d.tx_errors,
                    tx_dropped: d.tx_dropped,
                    ..Default::default()
                })
                .collect();
        }
        Err(e) => debug!("check: {}", crate::error_chain(&e)),
    }
}

fn display_or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown version)"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim's error message carries why an internal step failed, not
    /// only which step.
    #[test]
    fn an_internal_error_reaches_the_shim_with_its_causes() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = CtrError::Internal {
            what: "writing /run/clh/c1/config.json".into(),
            source: Some(Box::new(cause)),
        };
        let Error::RpcStatus(s) = status("CreateContainer", e) else {
            panic!("not a status");
        };
        assert_eq!(s.code(), Code::INTERNAL);
        assert_eq!(s.message(), "writing /run/clh/c1/config.json: no such file");
    }

    /// A netlink failure names the step and the kernel's reason.
    #[test]
    fn a_network_error_reaches_the_shim_with_its_cause() {
        let mut nack = rtnetlink::packet_core::ErrorMessage::default();
        nack.code = std::num::NonZeroI32::new(-libc::ENETUNREACH);
        let e = NetError::Netlink {
            what: "adding the route default via 10.0.0.1 (NIC 02:00:00:00:00:05)".into(),
            source: rtnetlink::Error::NetlinkError(nack),
        };
        let Error::RpcStatus(s) = net_status(e) else {
            panic!("not a status");
        };
        assert_eq!(s.code(), Code::INTERNAL);
        assert!(
            s.message().starts_with(
                "ConfigureNetwork: adding the route default via 10.0.0.1 (NIC 02:00:00:00:00:05): "
            ),
            "{}",
            s.message()
        );
        assert!(s.message().contains("unreachable"), "{}", s.message());
    }
}
