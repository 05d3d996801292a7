//! The agent's health check (REL-AGENT-01, REL-PANIC-01): a running pod's
//! agent is asked `Check` every interval, each call bounded by a deadline.
//! A pod whose VMM and virtiofsd live on can still be dead inside: a hung
//! agent, a guest kernel that panicked and hangs, or one that rebooted
//! (Cloud Hypervisor has no `-no-reboot`: the guest comes back with a new
//! boot id and no containers). Each ends the check with why.

use std::time::Duration;

use clh_agent_client::AgentClient;
use tokio::time::MissedTickBehavior;

use super::error::chain;

/// How often, and how patiently, the agent is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    /// One check that takes longer fails the pod.
    pub deadline: Duration,
}

/// Resolves when the agent fails a check, with what failed; never while
/// it answers in time from the same boot.
pub async fn until_unhealthy(agent: AgentClient, check: HealthCheck) -> String {
    let agent = agent.with_call_timeout(check.deadline);
    let mut ticker = tokio::time::interval(check.interval);
    // A slow check delays the next one; it does not make a burst of them.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut boot_id: Option<String> = None;
    loop {
        ticker.tick().await;
        // ttrpc enforces the deadline too; this one holds whatever the
        // transport does.
        let reply = match tokio::time::timeout(check.deadline, agent.check()).await {
            Err(_) => {
                return format!(
                    "the agent did not answer a health check within {} ms",
                    check.deadline.as_millis()
                )
            }
            Ok(Err(e)) => return format!("the agent's health check failed: {}", chain(&e)),
            Ok(Ok(reply)) => reply,
        };
        match &boot_id {
            None => boot_id = Some(reply.boot_id),
            Some(first) if *first != reply.boot_id => {
                return format!(
                    "the guest rebooted (boot id {first} became {}): its containers are gone",
                    reply.boot_id
                )
            }
            Some(_) => {}
        }
    }
}
