//! The request checks: what plan() takes, and that everything else is
//! refused as INVALID_ARGUMENT before the guest is touched.

use super::*;

const MAC: &str = "02:00:00:00:00:05";

fn addr(address: &str, prefix_len: u32) -> IpAddress {
    IpAddress {
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn nic(mac: &str, name: &str) -> NetworkInterface {
    NetworkInterface {
        mac: mac.into(),
        name: name.into(),
        mtu: 1400,
        addresses: vec![addr("10.88.0.5", 16), addr("fd00::5", 64)],
        ..Default::default()
    }
}

fn route(destination: &str, prefix_len: u32, gateway: &str, family: u32) -> NetworkRoute {
    NetworkRoute {
        destination: destination.into(),
        prefix_len,
        gateway: gateway.into(),
        device_mac: MAC.into(),
        family,
        ..Default::default()
    }
}

fn config(interfaces: Vec<NetworkInterface>, routes: Vec<NetworkRoute>) -> NetworkConfig {
    NetworkConfig {
        interfaces,
        routes,
        ..Default::default()
    }
}

fn cidr(s: &str, prefix_len: u8) -> Cidr {
    Cidr {
        addr: s.parse().unwrap(),
        prefix_len,
    }
}

#[test]
fn a_pod_network_becomes_a_plan_with_on_link_routes_first() {
    let mut second = nic("02:00:00:00:00:0A", "net1");
    second.mtu = 0;
    second.addresses.clear();
    let routes = vec![
        route("", 0, "10.88.0.1", 4),
        route("192.168.0.0", 16, "10.99.0.1", 4),
        route("10.99.0.0", 24, "", 4),
        route("::", 0, "fd00::1", 6),
        route("", 0, "", 6),
    ];
    let plan = plan(&config(vec![nic(MAC, "eth0"), second], routes)).unwrap();

    let mac = Mac([2, 0, 0, 0, 0, 5]);
    assert_eq!(
        plan.interfaces,
        [
            Interface {
                mac,
                name: Some("eth0".into()),
                mtu: Some(1400),
                addresses: vec![cidr("10.88.0.5", 16), cidr("fd00::5", 64)],
            },
            Interface {
                mac: Mac([2, 0, 0, 0, 0, 0x0a]),
                name: Some("net1".into()),
                mtu: None,
                addresses: vec![],
            },
        ]
    );
    let r = |v6, destination, gateway: Option<&str>| Route {
        v6,
        destination,
        gateway: gateway.map(|g| g.parse().unwrap()),
        device: mac,
    };
    assert_eq!(
        plan.routes,
        [
            r(false, Some(cidr("10.99.0.0", 24)), None),
            r(true, None, None),
            r(false, None, Some("10.88.0.1")),
            r(false, Some(cidr("192.168.0.0", 16)), Some("10.99.0.1")),
            r(true, None, Some("fd00::1")),
        ]
    );
}

#[test]
fn an_empty_name_keeps_the_kernels_and_a_15_byte_one_fits() {
    let cfg = config(
        vec![nic(MAC, ""), nic("02:00:00:00:00:06", "abcdefghijklmno")],
        vec![],
    );
    let plan = plan(&cfg).unwrap();
    assert_eq!(plan.interfaces[0].name, None);
    assert_eq!(plan.interfaces[1].name.as_deref(), Some("abcdefghijklmno"));
    assert_eq!(plan.interfaces[1].mac.to_string(), "02:00:00:00:00:06");
}

#[test]
fn bad_requests_are_refused_as_invalid_arguments() {
    let with_nic = |f: fn(&mut NetworkInterface)| {
        let mut n = nic(MAC, "eth0");
        f(&mut n);
        config(vec![n], vec![])
    };
    let with_route = |r: NetworkRoute| config(vec![nic(MAC, "eth0")], vec![r]);
    let cases = [
        (
            with_nic(|n| n.mac = "02:00:00:00:05".into()),
            "not six hex bytes",
        ),
        (
            with_nic(|n| n.mac = "02:00:00:00:00:05:06".into()),
            "not six hex",
        ),
        (
            with_nic(|n| n.mac = "020000000005".into()),
            "not six hex bytes",
        ),
        (
            with_nic(|n| n.mac = "02:00:00:00:00:g5".into()),
            "not six hex bytes",
        ),
        (
            with_nic(|n| n.mac = "02:00:00:00:00:+5".into()),
            "not six hex bytes",
        ),
        (
            with_nic(|n| n.name = "abcdefghijklmnop".into()),
            "at most 15 bytes",
        ),
        (with_nic(|n| n.name = "eth/0".into()), "name \"eth/0\""),
        (with_nic(|n| n.name = "eth 0".into()), "name \"eth 0\""),
        (with_nic(|n| n.name = "eth\t0".into()), "name"),
        (with_nic(|n| n.name = "..".into()), "name \"..\""),
        (
            with_nic(|n| n.addresses = vec![addr("10.88.0.5", 33)]),
            "at most 32",
        ),
        (
            with_nic(|n| n.addresses = vec![addr("fd00::5", 129)]),
            "at most 128",
        ),
        (
            with_nic(|n| n.addresses = vec![addr("10.88.0", 16)]),
            "no IP address",
        ),
        (
            with_nic(|n| n.addresses = vec![addr("10.88.0.5/16", 16)]),
            "no IP address",
        ),
        (
            with_nic(|n| n.addresses = vec![addr("0.0.0.0", 0)]),
            "not a unicast",
        ),
        (
            with_nic(|n| n.addresses = vec![addr("ff02::1", 64)]),
            "not a unicast",
        ),
        (
            config(vec![nic(MAC, "eth0"), nic(MAC, "eth1")], vec![]),
            "interface 1: MAC 02:00:00:00:00:05 twice",
        ),
        (
            config(
                vec![nic(MAC, "eth0"), nic("02:00:00:00:00:06", "eth0")],
                vec![],
            ),
            "interface 1: name \"eth0\" twice",
        ),
        (with_route(route("", 0, "10.88.0.1", 5)), "family 5"),
        (with_route(route("", 0, "10.88.0.1", 0)), "family 0"),
        (
            with_route(route("", 0, "fd00::1", 4)),
            "gateway fd00::1 in a family 4",
        ),
        (
            with_route(route("", 0, "10.88.0.1", 6)),
            "gateway 10.88.0.1 in a family 6",
        ),
        (with_route(route("", 0, "0.0.0.0", 4)), "gateway 0.0.0.0"),
        (with_route(route("", 0, "router", 4)), "gateway \"router\""),
        (
            with_route(route("fd01::", 64, "", 4)),
            "destination fd01::/64 in a family 4",
        ),
        (
            with_route(route("", 8, "10.88.0.1", 4)),
            "prefix_len 8 without a destination",
        ),
        (with_route(route("10.0.0.5", 24, "", 4)), "host bits"),
        (with_route(route("fd01::1", 64, "", 6)), "host bits"),
        (with_route(route("10.0.0.0", 33, "", 4)), "at most 32"),
        (
            with_route(NetworkRoute {
                device_mac: "02:00:00:00:00:07".into(),
                ..route("", 0, "10.88.0.1", 4)
            }),
            "route 0: device_mac 02:00:00:00:00:07 is none of the interfaces'",
        ),
        (
            with_route(NetworkRoute {
                device_mac: "".into(),
                ..route("", 0, "10.88.0.1", 4)
            }),
            "device_mac: MAC \"\"",
        ),
    ];
    for (cfg, want) in cases {
        let e = plan(&cfg).expect_err(want);
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
        assert!(e.to_string().contains(want), "{e:?} does not say {want:?}");
    }
}

#[test]
fn a_mac_is_matched_whatever_its_case() {
    let upper = plan(&config(vec![nic("02:AB:00:00:00:05", "")], vec![])).unwrap();
    let lower = plan(&config(vec![nic("02:ab:00:00:00:05", "")], vec![])).unwrap();
    assert_eq!(upper.interfaces[0].mac, lower.interfaces[0].mac);
    assert_eq!(upper.interfaces[0].mac.to_string(), "02:ab:00:00:00:05");
}

#[test]
fn host_bits_are_those_past_the_prefix() {
    assert!(host_bits_zero(cidr("0.0.0.0", 0)));
    assert!(!host_bits_zero(cidr("10.0.0.0", 0)));
    assert!(host_bits_zero(cidr("10.0.0.5", 32)));
    assert!(host_bits_zero(cidr("10.0.0.0", 8)));
    assert!(!host_bits_zero(cidr("10.128.0.0", 8)));
    assert!(host_bits_zero(cidr("::", 0)));
    assert!(host_bits_zero(cidr("fd00::5", 128)));
    assert!(host_bits_zero(cidr("fd00::8000", 113)));
    assert!(!host_bits_zero(cidr("fd00::8000", 112)));
    assert!(!host_bits_zero(cidr("fd00::4000", 113)));
}

/// The shim's operator learns which NIC is missing, and that it is the
/// VM, not the request, that is wrong.
#[test]
fn a_missing_nic_is_a_failed_precondition_naming_its_mac() {
    let e = NetError::NoSuchNic {
        mac: Mac([2, 0, 0, 0, 0, 0xee]),
        waited: Duration::from_secs(5),
    };
    assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(
        e.to_string(),
        "no NIC with MAC 02:00:00:00:00:ee appeared in 5000ms: the VM has no such NIC"
    );
}
