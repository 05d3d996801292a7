//! Applies a [`Plan`] over rtnetlink, in the order the kernel needs: `lo`
//! up; each NIC down, renamed, MTU, addresses, up; then the routes, once
//! every NIC is up and has its addresses (a route's gateway must already be
//! reachable).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info};

use super::{Interface, Mac, NetError, Plan, Route};

/// How often to look again for a NIC that has not appeared yet.
const NIC_POLL: Duration = Duration::from_millis(20);

/// Applies `plan` to the current network namespace, waiting up to
/// `nic_deadline` for its NICs to appear. Idempotent: what the guest
/// already has (an address, a kernel prefix route) is not an error.
pub async fn apply(plan: &Plan, nic_deadline: Duration) -> Result<(), NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    // The connection task lives only as long as this call, even if the
    // call itself is dropped half-way.
    let _connection = AbortOnDrop(tokio::spawn(connection));

    let lo = LinkUnspec::new_with_name("lo").up().build();
    let r = handle.link().set(lo).execute().await;
    r.map_err(netlink("bringing lo up"))?;

    let mut nics = wait_for_nics(&handle, plan, nic_deadline).await?;
    rename_out_of_the_way(&handle, plan, &mut nics).await?;
    for (iface, nic) in plan.interfaces.iter().zip(&nics) {
        configure_nic(&handle, iface, nic).await?;
    }
    let index: HashMap<Mac, u32> = (plan.interfaces.iter().zip(&nics))
        .map(|(iface, nic)| (iface.mac, nic.index))
        .collect();
    for route in &plan.routes {
        // plan() checked that each route's device is one of the interfaces.
        let index = (index.get(&route.device).copied())
            .ok_or_else(|| NetError::Invalid(format!("no interface for route {route:?}")))?;
        add_route(&handle, route, index).await?;
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A guest link as netlink lists it.
#[derive(Debug, Clone)]
struct Nic {
    index: u32,
    name: String,
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Whether `e` says the thing to add is there already.
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.to_io().raw_os_error() == Some(libc::EEXIST))
}

/// The guest link of each of the plan's interfaces, in its order, polling
/// until all have appeared or `deadline` has passed.
async fn wait_for_nics(
    handle: &Handle,
    plan: &Plan,
    deadline: Duration,
) -> Result<Vec<Nic>, NetError> {
    let start = tokio::time::Instant::now();
    loop {
        let links = list_links(handle).await?;
        let found: Vec<_> = plan.interfaces.iter().map(|i| links.get(&i.mac)).collect();
        if let Some(missing) = plan
            .interfaces
            .iter()
            .zip(&found)
            .find(|(_, f)| f.is_none())
        {
            if start.elapsed() >= deadline {
                let mac = missing.0.mac;
                return Err(NetError::NoSuchNic {
                    mac,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(NIC_POLL).await;
            continue;
        }
        return Ok(found.into_iter().flatten().cloned().collect());
    }
}

/// The guest's links by MAC. Where two share a MAC (a VLAN on a NIC), the
/// lowest index, the NIC itself, wins.
async fn list_links(handle: &Handle) -> Result<HashMap<Mac, Nic>, NetError> {
    let mut links = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(netlink("listing links"))? {
        let mut mac = None;
        let mut name = None;
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a).ok().map(Mac),
                LinkAttribute::IfName(n) => name = Some(n),
                _ => {}
            }
        }
        let (Some(mac), Some(name)) = (mac, name) else {
            continue;
        };
        let index = msg.header.index;
        if links.get(&mac).is_none_or(|n: &Nic| n.index > index) {
            links.insert(mac, Nic { index, name });
        }
    }
    Ok(links)
}

/// Where NICs swap names (the guest calls eth0 the NIC the pod calls eth1),
/// renaming one to a name the other still holds fails with EEXIST; so each
/// NIC holding a name another is to get first moves to a temporary one.
async fn rename_out_of_the_way(
    handle: &Handle,
    plan: &Plan,
    nics: &mut [Nic],
) -> Result<(), NetError> {
    for (iface, nic) in plan.interfaces.iter().zip(nics.iter_mut()) {
        let wanted_by_another = plan
            .interfaces
            .iter()
            .any(|o| o.mac != iface.mac && o.name.as_ref() == Some(&nic.name));
        if iface.name.is_none() || !wanted_by_another {
            continue;
        }
        // Unique among links: ifindexes are; at most 13 bytes.
        let tmp = format!("tmp{}", nic.index);
        set_down(handle, iface.mac, nic).await?;
        let msg = LinkUnspec::new_with_index(nic.index)
            .name(tmp.clone())
            .build();
        let r = handle.link().set(msg).execute().await;
        r.map_err(netlink(format!(
            "renaming NIC {} ({}) to {tmp}",
            iface.mac, nic.name
        )))?;
        nic.name = tmp;
    }
    Ok(())
}

async fn set_down(handle: &Handle, mac: Mac, nic: &Nic) -> Result<(), NetError> {
    let msg = LinkUnspec::new_with_index(nic.index).down().build();
    let r = handle.link().set(msg).execute().await;
    r.map_err(netlink(format!("setting NIC {mac} ({}) down", nic.name)))
}

async fn configure_nic(handle: &Handle, iface: &Interface, nic: &Nic) -> Result<(), NetError> {
    let mac = iface.mac;
    // Down first: the kernel refuses to rename a link that is up.
    set_down(handle, mac, nic).await?;
    let mut name = nic.name.clone();
    if let Some(new) = iface.name.as_ref().filter(|n| **n != nic.name) {
        let msg = LinkUnspec::new_with_index(nic.index)
            .name(new.clone())
            .build();
        let r = handle.link().set(msg).execute().await;
        r.map_err(netlink(format!("renaming NIC {mac} ({name}) to {new}")))?;
        name.clone_from(new);
    }
    if let Some(mtu) = iface.mtu {
        let msg = LinkUnspec::new_with_index(nic.index).mtu(mtu).build();
        let r = handle.link().set(msg).execute().await;
        r.map_err(netlink(format!(
            "setting the MTU of {name} ({mac}) to {mtu}"
        )))?;
    }
    for cidr in &iface.addresses {
        let mut req = handle.address().add(nic.index, cidr.addr, cidr.prefix_len);
        if cidr.addr.is_ipv6() {
            // No duplicate address detection: the host side already owns
            // the address, and with DAD it would stay tentative (unusable)
            // for a second or more after the link comes up.
            let flags = AddressAttribute::Flags(AddressFlags::Nodad);
            req.message_mut().attributes.push(flags);
        }
        match req.execute().await {
            Err(e) if !exists(&e) => {
                return Err(netlink(format!("adding {cidr} to {name} ({mac})"))(e));
            }
            _ => {}
        }
    }
    let msg = LinkUnspec::new_with_index(nic.index).up().build();
    let r = handle.link().set(msg).execute().await;
    r.map_err(netlink(format!("setting {name} ({mac}) up")))?;
    let addresses: Vec<_> = iface.addresses.iter().map(ToString::to_string).collect();
    info!(%name, %mac, addresses = %addresses.join(" "), "network interface configured");
    Ok(())
}

async fn add_route(handle: &Handle, route: &Route, index: u32) -> Result<(), NetError> {
    let what = || {
        let dst = route
            .destination
            .map_or("default".into(), |d| d.to_string());
        match route.gateway {
            Some(gw) => format!("adding the route {dst} via {gw} (NIC {})", route.device),
            None => format!("adding the route {dst} on-link (NIC {})", route.device),
        }
    };
    // plan() checked the families, so the builder has nothing to refuse.
    let bad = |e: String| NetError::Invalid(format!("{}: {e}", what()));
    let mut b = RouteMessageBuilder::<IpAddr>::new().output_interface(index);
    // Set explicitly: a default on-link route has no address to take it from.
    b.get_mut().header.address_family = if route.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    if let Some(dst) = route.destination {
        b = b
            .destination_prefix(dst.addr, dst.prefix_len)
            .map_err(|e| bad(e.to_string()))?;
    }
    match route.gateway {
        Some(gw) => b = b.gateway(gw).map_err(|e| bad(e.to_string()))?,
        // As `ip route add ... dev` does: an IPv4 route without a gateway
        // reaches its destination directly on the link.
        None if !route.v6 => b = b.scope(RouteScope::Link),
        None => {}
    }
    match handle.route().add(b.build()).execute().await {
        Err(e) if !exists(&e) => Err(netlink(what())(e)),
        _ => {
            debug!("{} done", what());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
