//! apply() for real, in a network namespace of its own (needs root), read
//! back over netlink.

use std::net::{Ipv4Addr, Ipv6Addr};

use clh_agent_protocol::{IpAddress, NetworkConfig, NetworkInterface, NetworkRoute};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::LinkVeth;

use super::*;
use crate::network::{plan, NIC_DEADLINE};

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];

#[test]
fn a_config_is_applied_in_a_fresh_network_namespace() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: configuring links needs root");
        return;
    }
    // Only this thread moves to the new namespace, so the host and the
    // other tests keep their network; the namespace goes with the thread.
    let outcome = std::thread::spawn(|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(in_fresh_namespace())
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(skip)) => println!("SKIPPED: {skip}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Err: the kernel lacks what the test needs (it is skipped).
async fn in_fresh_namespace() -> Result<(), String> {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);

    // The NIC shows up after apply() starts looking, as a virtio-net NIC
    // that probes late does. A veth, its peer up so that it has a carrier.
    let h = handle.clone();
    let late_nic = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let veth = LinkVeth::new("nic0", "host0").address(MAC.to_vec());
        h.link().add(veth.build()).execute().await?;
        let peer = LinkUnspec::new_with_name("host0").up().build();
        h.link().set(peer).execute().await
    });
    let plan = plan(&pod_config()).unwrap();
    let applied = apply(&plan, NIC_DEADLINE).await;
    if let Err(e) = late_nic.await.unwrap() {
        return Err(format!("no veth links in this kernel: {e}"));
    }
    applied.unwrap();

    let (links, index) = check_links(&handle).await;
    check_addresses(&handle, index).await;
    check_routes(&handle, index).await;
    assert!(links["lo"].header.flags.contains(LinkFlags::Up), "lo up");

    // Again: what the guest has already (the IPv4 address, the kernel's
    // prefix route) is no error.
    apply(&plan, NIC_DEADLINE).await.unwrap();
    check_routes(&handle, index).await;

    let mut absent = pod_config();
    absent.interfaces[0].mac = "02:00:00:00:00:99".into();
    absent.routes.clear();
    let e = apply(
        &crate::network::plan(&absent).unwrap(),
        Duration::from_millis(100),
    )
    .await;
    let e = e.expect_err("no such NIC");
    assert!(matches!(e, NetError::NoSuchNic { .. }), "{e:?}");
    assert!(e.to_string().contains("02:00:00:00:00:99"), "{e}");

    swapped_names(&handle).await;
    Ok(())
}

fn pod_config() -> NetworkConfig {
    let addr = |a: &str, prefix_len| IpAddress {
        address: a.into(),
        prefix_len,
        ..Default::default()
    };
    let route = |dst: &str, prefix_len, gw: &str, family| NetworkRoute {
        destination: dst.into(),
        prefix_len,
        gateway: gw.into(),
        device_mac: "02:00:00:00:00:05".into(),
        family,
        ..Default::default()
    };
    NetworkConfig {
        interfaces: vec![NetworkInterface {
            mac: "02:00:00:00:00:05".into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![addr("10.88.0.5", 16), addr("fd00::5", 64)],
            ..Default::default()
        }],
        routes: vec![
            // Its gateway is reachable only through the on-link route
            // below: applied in the shim's order, it would fail.
            route("192.168.0.0", 16, "10.99.0.1", 4),
            route("", 0, "10.88.0.1", 4),
            route("", 0, "fd00::1", 6),
            // The kernel's own prefix route for 10.88.0.5/16: EEXIST.
            route("10.88.0.0", 16, "", 4),
            route("10.99.0.0", 24, "", 4),
        ],
        ..Default::default()
    }
}

async fn links(handle: &Handle) -> HashMap<String, LinkMessage> {
    let dump = handle.link().get().execute();
    let links: Vec<LinkMessage> = dump.try_collect().await.unwrap();
    let name = |l: &LinkMessage| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    };
    links.into_iter().map(|l| (name(&l).unwrap(), l)).collect()
}

fn mac_of(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    })
}

/// eth0: renamed from nic0, MTU 1400, up. Returns the links and its index.
async fn check_links(handle: &Handle) -> (HashMap<String, LinkMessage>, u32) {
    let links = links(handle).await;
    assert!(!links.contains_key("nic0"), "renamed");
    let eth0 = &links["eth0"];
    assert_eq!(mac_of(eth0), Some(MAC.to_vec()));
    assert!(eth0.attributes.contains(&LinkAttribute::Mtu(1400)));
    assert!(eth0.header.flags.contains(LinkFlags::Up), "eth0 up");
    let index = eth0.header.index;
    (links, index)
}

/// Both addresses, the IPv6 one usable at once (not tentative).
async fn check_addresses(handle: &Handle, index: u32) {
    let dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let msgs: Vec<_> = dump.try_collect().await.unwrap();
    let mut found = vec![];
    for m in msgs {
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        });
        let flags = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        });
        if let Some(addr) = addr.filter(|a| !a.is_ipv6() || !a.to_string().starts_with("fe80")) {
            let tentative = flags.is_some_and(|f| f.contains(AddressFlags::Tentative));
            assert!(!tentative, "{addr} tentative");
            found.push(format!("{addr}/{}", m.header.prefix_len));
        }
    }
    found.sort();
    assert_eq!(found, ["10.88.0.5/16", "fd00::5/64"]);
}

async fn check_routes(handle: &Handle, index: u32) {
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
    let mut routes = vec![];
    for query in [v4, v6] {
        let dump = handle.route().get(query).execute();
        let msgs: Vec<RouteMessage> = dump.try_collect().await.unwrap();
        routes.extend(msgs.iter().map(describe));
    }
    for want in [
        "default via 10.88.0.1 dev",
        "192.168.0.0/16 via 10.99.0.1 dev",
        "10.99.0.0/24 on-link dev",
        "10.88.0.0/16 on-link dev",
        "default via fd00::1 dev",
    ] {
        let want = format!("{want} {index}");
        assert!(routes.contains(&want), "no {want:?} in {routes:#?}");
    }
}

/// "<dst> via <gw> dev <oif>" or "<dst> on-link dev <oif>".
fn describe(r: &RouteMessage) -> String {
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(a) => a.to_string(),
        RouteAddress::Inet6(a) => a.to_string(),
        other => format!("{other:?}"),
    };
    let (mut dst, mut via, mut dev) = ("default".to_owned(), "on-link".to_owned(), 0);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                dst = format!("{}/{}", ip(d), r.header.destination_prefix_length);
            }
            RouteAttribute::Gateway(g) => via = format!("via {}", ip(g)),
            RouteAttribute::Oif(i) => dev = *i,
            _ => {}
        }
    }
    format!("{dst} {via} dev {dev}")
}

/// Two NICs whose guest names are the other's pod names swap them.
async fn swapped_names(handle: &Handle) {
    let veth = LinkVeth::new("sw0", "sw1").build();
    handle.link().add(veth).execute().await.unwrap();
    let before = links(handle).await;
    let mac = |name: &str| {
        let m = mac_of(&before[name]).unwrap();
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let nic = |mac: String, name: &str| NetworkInterface {
        mac,
        name: name.into(),
        ..Default::default()
    };
    let config = NetworkConfig {
        interfaces: vec![nic(mac("sw0"), "sw1"), nic(mac("sw1"), "sw0")],
        ..Default::default()
    };
    apply(&plan(&config).unwrap(), NIC_DEADLINE).await.unwrap();
    let after = links(handle).await;
    assert_eq!(mac_of(&after["sw1"]), mac_of(&before["sw0"]));
    assert_eq!(mac_of(&after["sw0"]), mac_of(&before["sw1"]));
}
