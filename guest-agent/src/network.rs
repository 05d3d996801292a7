//! ConfigureNetwork: gives the guest the network the pod's namespace has on
//! the host. The shim wires each host interface to a guest NIC with the
//! same MAC and sends the interfaces' names, MTUs, addresses and the routes;
//! the agent finds each NIC by MAC and configures it over netlink.
//!
//! This file holds the pure part (the request checked and turned into a
//! [`Plan`], so a bad request changes nothing in the guest); `netlink.rs`
//! applies a plan.

mod netlink;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use clh_agent_protocol::{IpAddress, NetworkConfig, NetworkInterface, NetworkRoute};

pub use netlink::apply;

/// How long a NIC may take to appear: virtio-net probes asynchronously, so
/// a NIC the VM was booted with can show up just after the agent starts.
pub const NIC_DEADLINE: Duration = Duration::from_secs(5);

/// The longest interface name Linux takes (IFNAMSIZ less the NUL).
const MAX_IFNAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request is wrong; nothing in the guest was changed.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "no NIC with MAC {mac} appeared in {}ms: the VM has no such NIC",
        waited.as_millis()
    )]
    NoSuchNic { mac: Mac, waited: Duration },
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            // The shim asked for a NIC it believes it gave the VM: the VM,
            // not the request, is not as it must be.
            Self::NoSuchNic { .. } => ttrpc::Code::FAILED_PRECONDITION,
            Self::Socket(_) | Self::Netlink { .. } => ttrpc::Code::INTERNAL,
        }
    }
}

/// Validates `config` and applies it to the guest.
pub async fn configure(config: &NetworkConfig) -> Result<(), NetError> {
    let plan = plan(config)?;
    apply(&plan, NIC_DEADLINE).await
}

/// A MAC address; displayed as the protocol writes it (lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An address with its prefix length, checked against its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A validated request: what [`apply`] does, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<Interface>,
    /// On-link routes first: a gateway must be reachable when its route is
    /// added, and it may be reachable only through one of them.
    pub routes: Vec<Route>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Interface {
    pub mac: Mac,
    /// None: the NIC keeps the name the guest kernel gave it.
    pub name: Option<String>,
    /// None: the NIC keeps its MTU.
    pub mtu: Option<u32>,
    pub addresses: Vec<Cidr>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub v6: bool,
    /// None: the default route.
    pub destination: Option<Cidr>,
    /// None: on-link.
    pub gateway: Option<IpAddr>,
    pub device: Mac,
}

/// Checks `config` and turns it into a [`Plan`]; every fault is
/// [`NetError::Invalid`], naming the field.
pub fn plan(config: &NetworkConfig) -> Result<Plan, NetError> {
    let mut interfaces: Vec<Interface> = Vec::with_capacity(config.interfaces.len());
    for (i, nic) in config.interfaces.iter().enumerate() {
        let iface = interface(nic).map_err(|e| invalid(format!("interface {i}: {e}")))?;
        if interfaces.iter().any(|o| o.mac == iface.mac) {
            return Err(invalid(format!("interface {i}: MAC {} twice", iface.mac)));
        }
        if let Some(name) = &iface.name {
            if interfaces.iter().any(|o| o.name.as_ref() == Some(name)) {
                return Err(invalid(format!("interface {i}: name {name:?} twice")));
            }
        }
        interfaces.push(iface);
    }
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        let route = route(r).map_err(|e| invalid(format!("route {i}: {e}")))?;
        if !interfaces.iter().any(|nic| nic.mac == route.device) {
            return Err(invalid(format!(
                "route {i}: device_mac {} is none of the interfaces'",
                route.device
            )));
        }
        routes.push(route);
    }
    // Stable: routes keep the shim's order within each kind.
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(Plan { interfaces, routes })
}

fn invalid(msg: String) -> NetError {
    NetError::Invalid(msg)
}

fn interface(nic: &NetworkInterface) -> Result<Interface, String> {
    let mac = parse_mac(&nic.mac)?;
    let name = match nic.name.as_str() {
        "" => None,
        name => Some(check_name(name)?.to_owned()),
    };
    let addresses = nic.addresses.iter().map(cidr).collect::<Result<_, _>>()?;
    Ok(Interface {
        mac,
        name,
        mtu: (nic.mtu != 0).then_some(nic.mtu),
        addresses,
    })
}

fn route(r: &NetworkRoute) -> Result<Route, String> {
    let v6 = match r.family {
        4 => false,
        6 => true,
        f => return Err(format!("family {f}: neither 4 nor 6")),
    };
    let family_of = |a: IpAddr| if a.is_ipv6() { 6 } else { 4 };
    let destination = if r.destination.is_empty() {
        if r.prefix_len != 0 {
            return Err(format!("prefix_len {} without a destination", r.prefix_len));
        }
        None
    } else {
        let dst = parse_cidr(&r.destination, r.prefix_len)?;
        if family_of(dst.addr) != r.family {
            return Err(format!("destination {dst} in a family {} route", r.family));
        }
        if !host_bits_zero(dst) {
            return Err(format!("destination {dst} has host bits set"));
        }
        // 0.0.0.0/0 and ::/0 are the default route, as the empty one is.
        (dst.prefix_len != 0).then_some(dst)
    };
    let gateway = match r.gateway.as_str() {
        "" => None,
        gw => {
            let gw: IpAddr =
                (gw.parse()).map_err(|_| format!("gateway {gw:?} is no IP address"))?;
            if family_of(gw) != r.family || gw.is_unspecified() || gw.is_multicast() {
                return Err(format!("gateway {gw} in a family {} route", r.family));
            }
            Some(gw)
        }
    };
    let device = parse_mac(&r.device_mac).map_err(|e| format!("device_mac: {e}"))?;
    Ok(Route {
        v6,
        destination,
        gateway,
        device,
    })
}

fn cidr(a: &IpAddress) -> Result<Cidr, String> {
    let c = parse_cidr(&a.address, a.prefix_len)?;
    // The kernel would take these, but as an interface's address they can
    // only be a bug in the shim.
    if c.addr.is_unspecified() || c.addr.is_multicast() {
        return Err(format!("address {c} is not a unicast address"));
    }
    Ok(c)
}

fn parse_cidr(addr: &str, prefix_len: u32) -> Result<Cidr, String> {
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is no IP address"))?;
    let max = if addr.is_ipv6() { 128 } else { 32 };
    match u8::try_from(prefix_len) {
        Ok(prefix_len) if prefix_len <= max => Ok(Cidr { addr, prefix_len }),
        _ => Err(format!("{addr}/{prefix_len}: a prefix is at most {max}")),
    }
}

/// Whether `c` names a network (the kernel refuses a route to 10.0.0.5/24).
fn host_bits_zero(c: Cidr) -> bool {
    let (bits, value) = match c.addr {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    };
    // prefix_len <= bits: parse_cidr checked it.
    let host_bits = bits - u32::from(c.prefix_len);
    host_bits == 0 || value & (u128::MAX >> (128 - host_bits)) == 0
}

/// "aa:bb:cc:dd:ee:ff", either case.
fn parse_mac(s: &str) -> Result<Mac, String> {
    let bad = || format!("MAC {s:?} is not six hex bytes joined by ':'");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        // Hex digits only: from_str_radix would also take "+5".
        let part = (parts.next())
            .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(Mac(mac))
}

/// The names the kernel takes (dev_valid_name), so a bad one fails here
/// with a clear message rather than as a netlink EINVAL.
fn check_name(name: &str) -> Result<&str, String> {
    let ok = name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "name {name:?}: at most {MAX_IFNAME} bytes, no '/', ':' or whitespace"
        ))
    }
}

#[cfg(test)]
mod tests;
