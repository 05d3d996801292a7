//! Faults made on purpose (issue 13, REL-AGENT-01, REL-PANIC-01): a shim
//! config booting the test guest image, whose agent has the fault switch,
//! and the switch itself, thrown through the VM's hybrid-vsock socket as
//! the shim reaches the agent.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clh_agent_client::AgentClient;
pub use clh_agent_protocol::fault_request::Fault;

use crate::{ctr, GuestImage};

/// The health check the fault tests run under: a hung agent is noticed
/// within interval + deadline (4 s).
pub const HEALTH_INTERVAL_MS: u64 = 1_000;
pub const HEALTH_DEADLINE_MS: u64 = 3_000;

/// [`ctr::setup`] booting the test guest image, with a health check of
/// [`HEALTH_INTERVAL_MS`] and [`HEALTH_DEADLINE_MS`].
pub fn setup() -> Result<ctr::Setup> {
    let faults = GuestImage::locate_faults()?;
    let s = ctr::setup()?;
    let config = std::fs::read_to_string(&s.config)
        .with_context(|| format!("reading {}", s.config.display()))?;
    let plain = s.image.initramfs.display().to_string();
    if !config.contains(&plain) {
        bail!("{} names no initramfs {plain}", s.config.display());
    }
    let config = config.replace(&plain, &faults.initramfs.display().to_string())
        + &format!(
            "\n[timeouts]\nhealth_check_interval_ms = {HEALTH_INTERVAL_MS}\nhealth_check_ms = {HEALTH_DEADLINE_MS}\n"
        );
    std::fs::write(&s.config, config).with_context(|| format!("writing {}", s.config.display()))?;
    Ok(s)
}

/// The fault switch of one VM's agent, connected (through the VM's
/// hybrid-vsock socket, as the shim reaches the agent) before the fault is
/// thrown, so that a test times the fault and not the connection.
pub struct FaultSwitch {
    rt: tokio::runtime::Runtime,
    agent: AgentClient,
}

impl FaultSwitch {
    /// Connects to the agent of the VM whose state directory is `vm_dir`.
    pub fn connect(vm_dir: &Path) -> Result<Self> {
        let uds = vm_dir.join("vsock.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let agent = rt
            .block_on(AgentClient::connect(&uds, Duration::from_secs(30)))
            .with_context(|| format!("connecting to the agent at {}", uds.display()))?
            // A hung or panicking agent never answers: do not wait for it.
            .with_call_timeout(Duration::from_millis(500));
        Ok(Self { rt, agent })
    }

    /// Throws `fault`. The agent may not live to answer; an agent without
    /// the switch is an error.
    pub fn throw(&self, fault: Fault) -> Result<()> {
        match self.rt.block_on(self.agent.inject_fault(fault, 0)) {
            Err(clh_agent_client::Error::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            }) if status.code() == ttrpc::Code::UNIMPLEMENTED => {
                bail!("the agent has no fault switch: {}", status.message())
            }
            // Done, or the agent (or the guest) went before it answered.
            _ => Ok(()),
        }
    }

    /// Makes every later CreateContainer answer `delay` late, after its
    /// container is built; zero ends that. Unlike a hang or a panic, this
    /// is answered: the answer is awaited (a busy TCG guest may take
    /// seconds).
    pub fn slow_create(&self, delay: Duration) -> Result<()> {
        let delay_ms = u32::try_from(delay.as_millis()).context("a delay of over 49 days")?;
        let agent = self
            .agent
            .clone()
            .with_call_timeout(Duration::from_secs(30));
        (self
            .rt
            .block_on(agent.inject_fault(Fault::SLOW_CREATE, delay_ms)))
        .context("throwing SLOW_CREATE")
    }
}

/// Throws `fault` in the VM whose state directory is `vm_dir`.
pub fn inject(vm_dir: &Path, fault: Fault) -> Result<()> {
    FaultSwitch::connect(vm_dir)?.throw(fault)
}
