//! The test-only fault switch behind `InjectFault` (REL-AGENT-01,
//! REL-PANIC-01, a slow CreateContainer). Only an agent built with the
//! `fault-injection` feature (the test guest image, `make
//! guest-image-faults`) acts on it; the shipped agent answers
//! UNIMPLEMENTED, so no guest or host caller can hang or crash a
//! production VM through it.

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
        Fault::SLOW_CREATE => {
            imp::slow_create(req.delay_ms);
            Ok(())
        }
    }
}

/// Where CreateContainer has built its container and is about to answer:
/// waits out SLOW_CREATE's delay, if one was injected.
pub async fn before_create_answer() {
    imp::create_delay().await
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::atomic::{AtomicU32, Ordering};

    static CREATE_DELAY_MS: AtomicU32 = AtomicU32::new(0);

    pub fn slow_create(delay_ms: u32) {
        tracing::warn!(delay_ms, "fault injection: CreateContainer answers late");
        CREATE_DELAY_MS.store(delay_ms, Ordering::Relaxed);
    }

    pub async fn create_delay() {
        let ms = CREATE_DELAY_MS.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(ms.into())).await;
        }
    }

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
    pub fn slow_create(_delay_ms: u32) {}
    pub async fn create_delay() {}
}
