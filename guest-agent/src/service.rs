//! The ttrpc `Agent` service. Each handler has the same shape: trace the
//! call, validate, do the work in a domain module, map the error to a ttrpc
//! code. Handlers stay thin so this file does not grow into one big rpc.rs.

use crate::sysinfo::{self, SysInfoError};
use async_trait::async_trait;
use clh_agent_protocol::{
    CheckRequest, CheckResponse, VersionRequest, VersionResponse, PROTOCOL_VERSION,
};
use tracing::{debug, info, warn};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error};

/// The agent binary's own version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Default)]
pub struct AgentService;

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
}

fn do_check() -> Result<CheckResponse, SysInfoError> {
    let (mem_total_kib, mem_available_kib) = sysinfo::meminfo_kib()?;
    Ok(CheckResponse {
        kernel_release: sysinfo::kernel_release()?,
        boot_id: sysinfo::boot_id()?,
        uptime_ms: sysinfo::uptime_ms()?,
        agent_rss_kib: sysinfo::self_rss_kib()?,
        mem_total_kib,
        mem_available_kib,
        ..Default::default()
    })
}

fn display_or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown version)"
    } else {
        s
    }
}
