//! The pod's network namespace wired into its VM.
//!
//! The CNI plugins give the pod's network namespace its interfaces (a veth
//! with the pod's addresses, routes and MTU). The VM cannot join a
//! namespace, so for each interface the shim makes a tap in that namespace
//! and joins the two with tc: an ingress qdisc on each and a u32
//! match-everything filter whose action is `mirred egress redirect` to the
//! other (what Kata calls tcfilter). Every frame that reaches the veth
//! leaves through the tap into the guest's NIC and back, whatever CNI
//! plugin made the veth; the namespace's own stack never sees a frame.
//! The guest NIC gets the veth's MAC and MTU and the agent gives it the
//! veth's addresses and routes ([`PodNetwork::guest_config`]), so to the
//! pod's peers nothing changed.
//!
//! Everything here runs in a thread that entered the pod's namespace
//! ([`netns`]), over netlink; the taps are persistent until [`unwire`]
//! deletes them (which deletes their qdisc and filters with them).

mod forward;
mod netns;
mod tap;
#[cfg(test)]
mod tests;
mod wiring;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use forward::{intercept_loopback, original_port};

use clh_agent_protocol::{IpAddress, NetworkConfig, NetworkInterface, NetworkRoute};
use serde::{Deserialize, Serialize};

/// How long the netlink work of one [`wire`] or [`unwire`] may take.
const NETLINK_DEADLINE: Duration = Duration::from_secs(10);

/// The tc priority and handle of our filters, and the ingress qdisc's
/// parent (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// ETH_P_ALL, big-endian as tc wants the filter protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open the pod's network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the pod's network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("netlink: cannot {what} in the pod's network namespace")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot create the tap {name} in the pod's network namespace (is /dev/net/tun there and the tun module loaded?)")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod's interface {name} has no MAC address; only Ethernet interfaces can be wired into a VM")]
    NoMac { name: String },
    #[error(
        "netlink did not answer within {NETLINK_DEADLINE:?} in the pod's network namespace {path}"
    )]
    Timeout { path: PathBuf },
    #[error("internal error: the network thread for {path} panicked")]
    Panicked { path: PathBuf },
    #[error("cannot start a thread (and its runtime) in the pod's network namespace")]
    Thread(#[source] std::io::Error),
    #[error("port forwarding: cannot listen in the pod's network namespace")]
    Forward(#[source] std::io::Error),
    #[error("port forwarding: cannot add the loopback redirect in the pod's network namespace: {detail}")]
    Iptables { detail: String },
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// One of the pod's interfaces, wired to its tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WiredLink {
    /// The interface's name in the pod's namespace (e.g. eth0); the guest
    /// NIC gets it too.
    pub name: String,
    pub tap: String,
    /// "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    pub mtu: u32,
    /// Queue pairs of the tap (more than one: multi-queue).
    pub queues: u32,
    /// Not the link-local ones: the guest makes the same from the MAC.
    pub addresses: Vec<Cidr>,
}

/// A route of the pod's namespace, out of one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    /// The [`WiredLink::mac`] of the interface it goes out of.
    pub device_mac: String,
    pub ipv6: bool,
}

/// The pod's namespace, wired: what [`unwire`] undoes (recorded in the
/// VM's state.json, so a `delete` after a crash can undo it too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub links: Vec<WiredLink>,
    pub routes: Vec<Route>,
}

impl PodNetwork {
    /// What the agent configures in the guest (ConfigureNetwork).
    pub fn guest_config(&self) -> NetworkConfig {
        let interfaces = self
            .links
            .iter()
            .map(|l| NetworkInterface {
                mac: l.mac.clone(),
                name: l.name.clone(),
                mtu: l.mtu,
                addresses: l
                    .addresses
                    .iter()
                    .map(|c| IpAddress {
                        address: c.address.to_string(),
                        prefix_len: u32::from(c.prefix_len),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| NetworkRoute {
                destination: r
                    .destination
                    .map(|d| d.address.to_string())
                    .unwrap_or_default(),
                prefix_len: r.destination.map_or(0, |d| u32::from(d.prefix_len)),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device_mac: r.device_mac.clone(),
                family: if r.ipv6 { 6 } else { 4 },
                ..Default::default()
            })
            .collect();
        NetworkConfig {
            interfaces,
            routes,
            ..Default::default()
        }
    }
}

/// The name of the tap for the pod's `n`th interface.
fn tap_name(n: usize) -> String {
    format!("tap{n}_clh")
}

/// Wires every interface of the network namespace `netns` but `lo` (and
/// taps of ours, from an earlier try) to a tap of its own, with `queues`
/// queue pairs (multi-queue above 1). On failure what was made is undone.
/// A namespace with only `lo` gives no links.
pub fn wire(netns: &Path, queues: u32) -> Result<PodNetwork, NetError> {
    let queues = queues.max(1);
    let path = netns.to_path_buf();
    netns::run_in(netns, move |handle| async move {
        let (links, routes) = wiring::pod_interfaces(&handle).await?;
        let mut wired = PodNetwork {
            netns: path,
            links: Vec::new(),
            routes,
        };
        for (n, link) in links.into_iter().enumerate() {
            let tap = tap_name(n);
            let made = wiring::connect(&handle, &link, &tap, queues > 1).await;
            // Recorded before the result is looked at: a half-made pair
            // is undone with the rest.
            wired.links.push(WiredLink {
                name: link.name,
                tap,
                mac: link.mac,
                mtu: link.mtu,
                queues,
                addresses: link.addresses,
            });
            if let Err(e) = made {
                if let Err(u) = wiring::disconnect(&handle, &wired.links).await {
                    tracing::warn!(error = %u, "undoing a half-wired pod network");
                }
                return Err(e);
            }
        }
        Ok(wired)
    })
}

/// Deletes the taps of `network` (with their qdiscs and filters) and the
/// ingress qdiscs of its interfaces. Idempotent; a namespace that is gone
/// took all of it with it.
pub fn unwire(network: &PodNetwork) -> Result<(), NetError> {
    if network.links.is_empty() || !network.netns.exists() {
        return Ok(());
    }
    let links = network.links.clone();
    netns::run_in(&network.netns, move |handle| async move {
        wiring::disconnect(&handle, &links).await
    })
}
