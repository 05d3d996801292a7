//! The wiring in real network namespaces: a "pod" namespace with a veth
//! whose peer sits in a "bridge" namespace, as a CNI plugin leaves it.
//! Frames must cross veth → tap and tap → veth; unwire must leave nothing.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use nix::sched::{setns, unshare, CloneFlags};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::*;

/// A network namespace bound to a file in `dir`, removed on drop.
struct TestNetns(PathBuf);

impl TestNetns {
    fn new(dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        File::create(&path).unwrap();
        let target = path.clone();
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            let none = None::<&str>;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                none,
                nix::mount::MsFlags::MS_BIND,
                none,
            )
            .unwrap();
        })
        .join()
        .unwrap();
        TestNetns(path)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `f` in a thread that entered `netns`.
fn in_ns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(netns).unwrap();
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

async fn index(handle: &rtnetlink::Handle, name: &str) -> Option<u32> {
    let mut dump = handle.link().get().match_name(name.into()).execute();
    dump.try_next().await.ok().flatten().map(|m| m.header.index)
}

/// The pod namespace gets `eth0` (10.99.0.2/24, fd99::2/64, MTU 1400,
/// default route via 10.99.0.1); its peer `peer0` (10.99.0.1/24) goes to
/// the bridge namespace.
fn lay_out_cni_interfaces(pod: &Path, bridge: &Path) {
    let bridge_file = File::open(bridge).unwrap();
    netns::run_in(pod, move |h| async move {
        let veth = LinkVeth::new("eth0", "peer0").mtu(1400).build();
        h.link().add(veth).execute().await.unwrap();
        let peer = index(&h, "peer0").await.unwrap();
        let to_bridge = LinkUnspec::new_with_index(peer)
            .setns_by_fd(bridge_file.as_raw_fd())
            .build();
        h.link().set(to_bridge).execute().await.unwrap();
        let eth0 = index(&h, "eth0").await.unwrap();
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));
        h.address().add(eth0, v4, 24).execute().await.unwrap();
        let v6: IpAddr = "fd99::2".parse().unwrap();
        h.address().add(eth0, v6, 64).execute().await.unwrap();
        let up = LinkUnspec::new_with_index(eth0).up().build();
        h.link().set(up).execute().await.unwrap();
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(Ipv4Addr::new(10, 99, 0, 1))
            .output_interface(eth0)
            .build();
        h.route().add(default).execute().await.unwrap();
        Ok(())
    })
    .unwrap();
    netns::run_in(bridge, |h| async move {
        let peer = index(&h, "peer0").await.unwrap();
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
        h.address().add(peer, v4, 24).execute().await.unwrap();
        let up = LinkUnspec::new_with_index(peer).mtu(1400).up().build();
        h.link().set(up).execute().await.unwrap();
        Ok(())
    })
    .unwrap();
}

/// Attaches to the persistent tap `name` (in the calling thread's
/// namespace), non-blocking.
fn open_tap(name: &str) -> File {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = tap::IfReq::new(name, tap::IFF_TAP | tap::IFF_NO_PI);
    // SAFETY: as in tap::create; attaching to an existing persistent tap.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), tap::TUNSETIFF, &mut req) };
    assert!(rc >= 0, "{}", std::io::Error::last_os_error());
    nix::fcntl::fcntl(
        &tun,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    tun
}

/// The next frame read from `tap` whose EtherType is `ethertype`.
fn read_frame(tap: &File, ethertype: u16, deadline: Instant) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    loop {
        assert!(Instant::now() < deadline, "no frame reached the tap");
        match nix::unistd::read(tap, &mut buf) {
            Ok(n) if n >= 14 && u16::from_be_bytes([buf[12], buf[13]]) == ethertype => {
                return buf[..n].to_vec()
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
}

/// An Ethernet frame from `src_mac` to `dst_mac` holding an IPv4 UDP
/// datagram 10.99.0.2:7000 → 10.99.0.1:`port` with `payload`.
fn udp_frame(dst_mac: &[u8], src_mac: &[u8], port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    ip.extend_from_slice(&[10, 99, 0, 2, 10, 99, 0, 1]);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = [dst_mac, src_mac, &[0x08, 0x00]].concat();
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&7000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
    frame.extend_from_slice(payload);
    frame
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn each_interface_is_wired_to_a_tap_both_ways_and_unwired_without_a_trace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pod = TestNetns::new(dir.path(), "pod");
    let bridge = TestNetns::new(dir.path(), "bridge");
    lay_out_cni_interfaces(&pod.0, &bridge.0);

    let network = wire(&pod.0, 1).unwrap();
    assert_eq!(network.links.len(), 1, "{network:?}");
    let link = &network.links[0];
    assert_eq!(
        (link.name.as_str(), link.tap.as_str(), link.mtu),
        ("eth0", "tap0_clh", 1400)
    );
    let v4 = Cidr {
        address: "10.99.0.2".parse().unwrap(),
        prefix_len: 24,
    };
    let v6 = Cidr {
        address: "fd99::2".parse().unwrap(),
        prefix_len: 64,
    };
    assert!(
        link.addresses.contains(&v4) && link.addresses.contains(&v6),
        "{link:?}"
    );
    assert!(
        !link
            .addresses
            .iter()
            .any(|c| matches!(c.address, IpAddr::V6(a) if wiring::is_link_local(&a))),
        "a link-local address would clash with the guest's own: {link:?}"
    );
    let default = Route {
        destination: None,
        gateway: Some("10.99.0.1".parse().unwrap()),
        device_mac: link.mac.clone(),
        ipv6: false,
    };
    assert!(network.routes.contains(&default), "{:?}", network.routes);
    let config = network.guest_config();
    assert_eq!(config.interfaces[0].mac, link.mac);
    assert_eq!(config.interfaces[0].mtu, 1400);

    // veth → tap: the bridge side's ARP for the pod's address reaches the tap.
    let pod_mac = mac_bytes(&link.mac);
    let (frame, peer_mac) = {
        let pod_path = pod.0.clone();
        let receiver = std::thread::spawn(move || {
            in_ns(&pod_path, || {
                let tap = open_tap("tap0_clh");
                let deadline = Instant::now() + Duration::from_secs(10);
                (read_frame(&tap, 0x0806, deadline), tap)
            })
        });
        // A socket stays in the namespace it was made in.
        let sock = in_ns(&bridge.0, || UdpSocket::bind("10.99.0.1:0").unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        // Repeated until the receiver has attached: the first ARP may come
        // before it.
        while !receiver.is_finished() && Instant::now() < deadline {
            let _ = sock.send_to(b"x", "10.99.0.2:9");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (frame, tap) = receiver.join().unwrap();
        drop(tap);
        let peer_mac = frame[6..12].to_vec();
        (frame, peer_mac)
    };
    assert_eq!(&frame[38..42], &[10, 99, 0, 2], "ARP target: {frame:?}");

    // tap → veth: a datagram the "guest" writes reaches the bridge side.
    let listener = in_ns(&bridge.0, || UdpSocket::bind("10.99.0.1:7001").unwrap());
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let frame = udp_frame(&peer_mac, &pod_mac, 7001, b"from the guest");
    in_ns(&pod.0, move || {
        let tap = open_tap("tap0_clh");
        nix::unistd::write(&tap, &frame).unwrap();
    });
    let mut buf = [0u8; 64];
    let (n, from) = listener.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from the guest");
    assert_eq!(from.ip(), IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)));

    unwire(&network).unwrap();
    unwire(&network).unwrap();
    let left = netns::run_in(&pod.0, |h| async move {
        let tap = index(&h, "tap0_clh").await;
        let eth0 = index(&h, "eth0").await.unwrap();
        let mut qdiscs = h.qdisc().get().execute();
        let mut ingress = false;
        while let Some(q) = qdiscs.try_next().await.unwrap() {
            ingress |= q.header.index == i32::try_from(eth0).unwrap()
                && q.header.parent == rtnetlink::packet_route::tc::TcHandle::INGRESS;
        }
        Ok((tap, ingress))
    })
    .unwrap();
    assert_eq!(left, (None, false), "(tap, ingress qdisc on eth0) left");
}

#[test]
fn a_namespace_with_only_loopback_wires_nothing_and_a_missing_one_is_named() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lo_only = TestNetns::new(dir.path(), "lo");
    let network = wire(&lo_only.0, 1).unwrap();
    assert!(
        network.links.is_empty() && network.routes.is_empty(),
        "{network:?}"
    );
    let missing = dir.path().join("gone");
    let err = wire(&missing, 1).unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

/// The port-forward interceptor: a connection to any loopback port in the
/// pod's namespace lands on our listener, which learns the port asked for.
#[test]
fn loopback_connections_in_the_namespace_reach_the_interceptor_with_their_port() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pod = TestNetns::new(dir.path(), "pod");
    netns::run_in(&pod.0, |h| async move {
        let lo = index(&h, "lo").await.unwrap();
        let up = LinkUnspec::new_with_index(lo).up().build();
        h.link().set(up).execute().await.unwrap();
        Ok(())
    })
    .unwrap();
    let listener = intercept_loopback(&pod.0).unwrap();
    listener.set_nonblocking(false).unwrap();
    let client = in_ns(&pod.0, || {
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:5555".parse().unwrap(),
            Duration::from_secs(5),
        )
    });
    let _client = client.expect("the redirect did not take the connection");
    let (accepted, _) = listener.accept().unwrap();
    assert_eq!(original_port(&accepted).unwrap(), 5555);
}
