//! The pod network's part of a VM: its NICs, the wiring's undo, the
//! port-forward interceptor (clh-network does the work in the pod's
//! namespace, in blocking threads).

use super::*;

/// The VM's NICs: one per wired interface, on its tap, with its MAC and
/// MTU.
pub(super) fn nics(network: &PodNetwork) -> impl Iterator<Item = Nic> + '_ {
    network.links.iter().map(|l| Nic {
        tap: l.tap.clone(),
        mac: l.mac.clone(),
        mtu: l.mtu,
        queues: l.queues,
    })
}

/// A NIC's queue pairs: one per vCPU (multi-queue spreads the packets over
/// them), up to the hypervisor's limit.
pub(super) fn queue_pairs(vcpus: u32) -> u32 {
    vcpus.clamp(1, clh_hypervisor::MAX_QUEUES)
}

/// The port-forward interceptor in the pod's namespace; without it (no
/// iptables on the node) the pod runs, and port forwarding says why it
/// cannot (in the shim's log).
pub(super) async fn intercept_loopback(netns: Option<PathBuf>) -> Option<std::net::TcpListener> {
    let netns = netns?;
    let made = tokio::task::spawn_blocking(move || clh_network::intercept_loopback(&netns)).await;
    match made {
        Ok(Ok(listener)) => Some(listener),
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "port forwarding is off for this pod");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "port forwarding is off for this pod");
            None
        }
    }
}

/// Undoes [`clh_network::wire`] (in a blocking thread: it enters the
/// pod's namespace).
pub(super) async fn unwire(network: Option<PodNetwork>) -> anyhow::Result<()> {
    let Some(network) = network else {
        return Ok(());
    };
    let done = tokio::task::spawn_blocking(move || clh_network::unwire(&network)).await;
    match done {
        Ok(unwired) => Ok(unwired?),
        Err(e) => Err(anyhow::anyhow!("unwiring the pod network: {e}")),
    }
}
