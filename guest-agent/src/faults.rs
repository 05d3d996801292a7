//! The test-only fault switch behind `InjectFault` (REL-AGENT-01,
//! REL-PANIC-01). Only an agent built with the `fault-injection` feature
//! (the test guest image, `make guest-image-faults`) acts on it; the
//! shipped agent answers UNIMPLEMENTED, so no guest or host caller can
//! hang or crash a production VM through it.

use clh_agent_protocol::fault_request::Fault;
use clh_agent_protocol::FaultRequest;

/// Why a fault was not injected.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("this agent was built without fault injection (the test guest image has it)")]
    NotBuiltIn,
    #[error("unknown fault {0}")]
    Unknown(i32),
}

/// Makes `req`'s fault happen, after the caller's reply has had its
/// chance to leave (the fault runs on a task of its own).
pub fn inject(req: &FaultRequest) -> Result<(), FaultError> {
    let fault = req.fault.enum_value().map_err(FaultError::Unknown)?;
    if !cfg!(feature = "fault-injection") {
        return Err(FaultError::NotBuiltIn);
    }
    match fault {
        Fault::FAULT_UNSPECIFIED => Err(FaultError::Unknown(0)),
        Fault::HANG => {
            imp::hang();
            Ok(())
        }
        Fault::PANIC => {
            imp::panic_kernel();
            Ok(())
        }
    }
}

#[cfg(feature = "fault-injection")]
mod imp {
    /// One more blocker than the runtime has workers (main.rs: 2): once
    /// every worker runs one, nothing of the agent is polled again, as
    /// when it deadlocks. The guest and its containers run on.
    const BLOCKERS: usize = 3;

    pub fn hang() {
        tracing::warn!("fault injection: the agent stops serving");
        for _ in 0..BLOCKERS {
            tokio::spawn(async {
                loop {
                    std::thread::park();
                }
            });
        }
    }

    pub fn panic_kernel() {
        tracing::warn!("fault injection: panicking the guest kernel");
        tokio::spawn(async {
            // Root may always write the trigger, whatever kernel.sysrq says.
            if let Err(e) = std::fs::write("/proc/sysrq-trigger", b"c") {
                tracing::error!("fault injection: cannot panic the kernel: {e}");
            }
        });
    }
}

#[cfg(not(feature = "fault-injection"))]
mod imp {
    pub fn hang() {}
    pub fn panic_kernel() {}
}
