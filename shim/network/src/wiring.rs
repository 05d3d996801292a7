//! Netlink work in the pod's namespace: read its interfaces, addresses
//! and routes; connect an interface to its tap with tc; undo it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::{tap, Cidr, NetError, Route, WiredLink, ETH_P_ALL_BE, INGRESS_PARENT};

/// One of the pod's interfaces as its namespace has it.
pub(crate) struct PodLink {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn mac_string(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// Whether an interface is one of our taps (left by an earlier try).
fn is_our_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with("_clh")
}

/// The namespace's interfaces but `lo` and our taps, and the routes of
/// the main table out of them.
pub(crate) async fn pod_interfaces(
    handle: &Handle,
) -> Result<(Vec<PodLink>, Vec<Route>), NetError> {
    let mut links = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(netlink("list links"))? {
        if let Some(link) = pod_link(handle, msg).await? {
            links.push(link);
        }
    }
    let mut routes = Vec::new();
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
    for query in [v4, v6] {
        let mut dump = handle.route().get(query).execute();
        while let Some(msg) = dump.try_next().await.map_err(netlink("list routes"))? {
            if let Some(route) = pod_route(&links, &msg.header, &msg.attributes) {
                routes.push(route);
            }
        }
    }
    Ok((links, routes))
}

async fn pod_link(handle: &Handle, msg: LinkMessage) -> Result<Option<PodLink>, NetError> {
    if msg.header.link_layer_type == LinkLayerType::Loopback {
        return Ok(None);
    }
    let (mut name, mut mac, mut mtu) = (String::new(), None, 0);
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Address(a) => mac = Some(a.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    if is_our_tap(&name) {
        return Ok(None);
    }
    let mac = match mac {
        Some(bytes) if bytes.len() == 6 => mac_string(&bytes),
        _ => return Err(NetError::NoMac { name }),
    };
    let index = msg.header.index;
    let mut addresses = Vec::new();
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let what = format!("list the addresses of {name}");
    while let Some(a) = dump.try_next().await.map_err(netlink(what.clone()))? {
        // IFA_LOCAL is the address itself where there is a peer (IPv4);
        // IFA_ADDRESS is otherwise.
        let local = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        match address {
            Some(IpAddr::V6(v6)) if is_link_local(&v6) => {}
            Some(address) => addresses.push(Cidr {
                address,
                prefix_len: a.header.prefix_len,
            }),
            None => {}
        }
    }
    Ok(Some(PodLink {
        index,
        name,
        mac,
        mtu,
        addresses,
    }))
}

pub(crate) fn is_link_local(v6: &Ipv6Addr) -> bool {
    v6.segments()[0] & 0xffc0 == 0xfe80
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A unicast route of the main table out of one of `links`; not the
/// IPv6 link-local or multicast ones, which the guest makes itself.
fn pod_route(links: &[PodLink], header: &RouteHeader, attrs: &[RouteAttribute]) -> Option<Route> {
    let table = attrs
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || header.kind != RouteType::Unicast {
        return None;
    }
    let (mut destination, mut gateway, mut oif) = (None, None, None);
    for attr in attrs {
        match attr {
            RouteAttribute::Destination(d) => destination = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let link = links.iter().find(|l| Some(l.index) == oif)?;
    if let Some(IpAddr::V6(v6)) = destination {
        if is_link_local(&v6) || v6.is_multicast() {
            return None;
        }
    }
    let ipv6 = matches!(destination.or(gateway), Some(IpAddr::V6(_)))
        || u8::from(header.address_family) == libc::AF_INET6 as u8;
    Some(Route {
        destination: destination.map(|address| Cidr {
            address,
            prefix_len: header.destination_prefix_length,
        }),
        gateway,
        device_mac: link.mac.clone(),
        ipv6,
    })
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut dump = handle.link().get().match_name(name.to_string()).execute();
    let what = format!("find {name}");
    match dump.try_next().await.map_err(netlink(what.clone()))? {
        Some(msg) => Ok(msg.header.index),
        None => Err(NetError::Netlink {
            what,
            source: rtnetlink::Error::RequestFailed,
        }),
    }
}

/// Makes `tap` (MTU of `link`, up) and redirects every frame arriving on
/// either to the other.
pub(crate) async fn connect(
    handle: &Handle,
    link: &PodLink,
    tap: &str,
    multi_queue: bool,
) -> Result<(), NetError> {
    tap::create(tap, multi_queue)?;
    let tap_index = index_of(handle, tap).await?;
    let up = LinkUnspec::new_with_index(tap_index)
        .mtu(link.mtu)
        .up()
        .build();
    let what = format!("bring {tap} up");
    handle
        .link()
        .set(up)
        .execute()
        .await
        .map_err(netlink(what))?;
    for (from, to, name) in [
        (link.index, tap_index, &link.name),
        (tap_index, link.index, &tap.to_string()),
    ] {
        let what = format!("add an ingress qdisc to {name}");
        let index = i32::try_from(from).unwrap_or(i32::MAX);
        handle
            .qdisc()
            .add(index)
            .ingress()
            .execute()
            .await
            .map_err(netlink(what))?;
        let what = format!("redirect {name}'s ingress");
        handle
            .traffic_filter(index)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(netlink(what.clone()))?
            .execute()
            .await
            .map_err(netlink(what))?;
    }
    Ok(())
}

/// Deletes each link's tap and its interface's ingress qdisc (and so the
/// filters). What is already gone is not an error.
pub(crate) async fn disconnect(handle: &Handle, links: &[WiredLink]) -> Result<(), NetError> {
    let mut first_error = None;
    for link in links {
        if let Ok(index) = index_of(handle, &link.tap).await {
            let what = format!("delete {}", link.tap);
            if let Err(e) = handle.link().del(index).execute().await {
                first_error.get_or_insert(netlink(what)(e));
            }
        }
        if let Ok(index) = index_of(handle, &link.name).await {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            let mut del = handle.qdisc().del(index);
            let header = &mut del.message_mut().header;
            header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
            header.handle = rtnetlink::packet_route::tc::TcHandle::from(INGRESS_PARENT);
            // No ingress qdisc (never made, or gone): nothing to undo.
            let _ = del.execute().await;
        }
    }
    first_error.map_or(Ok(()), Err)
}
